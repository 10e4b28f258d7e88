"""Run configuration for SOS-VAE training (Langley et al., "Structured Uncertainty in the Observation Space of
Variational Autoencoders", TMLR 2022).

`TrainConfig` is a frozen dataclass, validated when it is built: every bad value raises one `ValueError` whose
message starts with the field's name and states the allowed values. Three presets give the scales used across
the project:

- ``smoke``: seconds on a CPU, for tests (16×16 images, a tiny trunk, one epoch on 32 images).
- ``cpu``: a faithful reduced scale that trains on 2 CPU cores in a few minutes per run (narrow ResNet with
  widths 16…64, latent 32, rank 25, the paper's constrained objective with a reachable KL target, mean
  pre-training for the first quarter of the epochs).
- ``paper``: CelebA at 218×178 RGB, the authors' network (``arch="authors"``, widths 64…512, 31.0 M
  parameters), latent 128, rank 25, batch 25, Adam 1e-4, target KL 45 (the authors' code defaults, METHOD.md
  §4–5).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

HEADS = ("lowrank", "lowrank-diag", "diagonal")
PRESETS = ("smoke", "cpu", "paper")
DEVICES = ("auto", "cpu", "cuda")
ARCHS = ("resnet", "authors")
PRECISIONS = ("auto", "fp32", "bf16")

# Channel counts of the datasets whose shape is known without loading them (used to reject rank >= D early;
# the model re-checks against the real image shape for every dataset).
_KNOWN_CHANNELS = {"orl": 1, "fashion-mnist": 1, "celeba": 3}

# What a command reports as a usage error (one line, exit code 2): bad values, paths that do not exist or cannot
# be written, a run directory that is taken, a damaged checkpoint. Anything else is a failure of the run itself.
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def _fail(field: str, message: str) -> None:
    raise ValueError(f"{field}: {message}")


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> Any:
    """Return ``value`` if it is an int (not a bool) >= ``minimum`` (or None when ``allow_none``); otherwise raise
    ``ValueError("<name>: must be an integer >= <minimum>[ or None], got <value>")``. The one integer check of
    every option and field in the package."""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, f"must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


def _check_float(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False,
                 allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive and value <= 0:
        ok = False
    if ok and nonnegative and value < 0:
        ok = False
    if not ok:
        what = "a finite number" + (" > 0" if positive else " >= 0" if nonnegative else "")
        _fail(name, f"must be {what}{' or None' if allow_none else ''}, got {value!r}")


def image_hw(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """(H, W) from an ``image_size`` given as an int (square), a pair, or None (dataset default)."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    return (int(image_size[0]), int(image_size[1]))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Build with `TrainConfig(...)` or `TrainConfig.preset(name, ...)`.

    Data: ``dataset`` (a name of `sosvae_lib.data.DATASETS`), ``root`` (data folder or None), ``image_size``
    (int, (H, W) or None for the dataset's default), ``max_items`` (deterministic train subset size or None),
    ``augment`` (None = dataset default), ``dequantize`` (add U(0, 1/256) noise to training images, the usual
    convention for a continuous density on 8-bit data).

    Model: ``arch`` the encoder and decoder trunk (``resnet``: this project's light pre-activation ResNet;
    ``authors``: the authors' network block for block, see `sosvae_lib.encoder`); ``head`` in ``HEADS``; ``rank``
    R of the covariance factor (ignored by ``diagonal``); ``latent`` size; ``width`` (channels of the
    full-resolution stage; each of ``levels`` stride-2 stages doubles it, capped at ``max_width``); ``eps`` the fixed diagonal of ``lowrank`` and the variance floor of the learned-diagonal
    heads; ``init_var`` the initial variance of the learned-diagonal heads.

    Objective (METHOD.md §4): ``target_kl`` T per image, ``damping`` c, ``lambda_lr`` η, ``lambda_init`` λ₀;
    ``entropy_target`` (nats per image, or None) adds a second damped constraint on the entropy of p(x|z);
    ``beta`` (or None) replaces the constrained objective by the β-ELBO NLL + β·KL; ``pretrain_epochs`` freezes the
    observation-noise head (P and d) for the first epochs.

    Optimisation: ``epochs``, ``batch_size`` (per process), ``lr`` (Adam), ``seed``, ``device`` in ``DEVICES``,
    ``num_workers`` of the data loader; ``precision`` of the encoder and trunk (``fp32``, ``bf16`` autocast, or
    ``auto``: bf16 on a CUDA device that supports it, fp32 elsewhere; the heads' outputs, the likelihood, the KL
    and the objective are always float32); ``data_on_device`` keeps the whole uint8 training set on the device
    (flips and dequantisation there too); ``compile`` wraps the model in `torch.compile`; ``deterministic`` makes a
    CUDA run bitwise reproducible (deterministic algorithms, no cuDNN autotuning; slower, see
    `sosvae_lib.devices.configure_cuda`; the CPU is reproducible without it).
    """

    dataset: str = "orl"
    root: str | None = None
    image_size: int | tuple[int, int] | None = None
    max_items: int | None = None
    augment: bool | None = None
    dequantize: bool = True

    arch: str = "resnet"
    head: str = "lowrank"
    rank: int = 25
    latent: int = 32
    width: int = 16
    levels: int = 3
    max_width: int = 512
    eps: float = 1e-5
    init_var: float = 0.01

    epochs: int = 40
    batch_size: int = 25
    lr: float = 1e-3
    target_kl: float = 30.0
    damping: float = 10.0
    lambda_lr: float = 1.0
    lambda_init: float = 0.0
    entropy_target: float | None = None
    beta: float | None = None
    pretrain_epochs: int = 0

    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    precision: str = "auto"
    data_on_device: bool = False
    compile: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            _fail("dataset", f"must be a dataset name such as 'orl', 'fashion-mnist', 'celeba', got {self.dataset!r}")
        if self.root is not None and not isinstance(self.root, str):
            _fail("root", f"must be a path string or None, got {self.root!r}")
        size = self.image_size
        if isinstance(size, list):  # JSON round trip gives lists
            object.__setattr__(self, "image_size", tuple(size))
            size = self.image_size
        if size is not None:
            pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
            if (not isinstance(pair, tuple) or len(pair) != 2
                    or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in pair)):
                _fail("image_size", f"must be a positive int, a pair (H, W) of positive ints, or None, got {size!r}")
        check_int("max_items", self.max_items, 1, allow_none=True)
        if self.augment is not None and not isinstance(self.augment, bool):
            _fail("augment", f"must be True, False or None, got {self.augment!r}")
        if not isinstance(self.dequantize, bool):
            _fail("dequantize", f"must be True or False, got {self.dequantize!r}")

        if self.arch not in ARCHS:
            _fail("arch", f"must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.head not in HEADS:
            _fail("head", f"must be one of {', '.join(HEADS)}, got {self.head!r}")
        check_int("rank", self.rank, 1)
        check_int("latent", self.latent, 1)
        check_int("width", self.width, 1)
        check_int("levels", self.levels, 1)
        check_int("max_width", self.max_width, 1)
        _check_float("eps", self.eps, positive=True)
        _check_float("init_var", self.init_var, positive=True)
        if self.init_var <= self.eps:
            _fail("init_var", f"must be larger than eps={self.eps}, got {self.init_var}")

        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        _check_float("lr", self.lr, positive=True)
        _check_float("target_kl", self.target_kl, positive=True)
        _check_float("damping", self.damping, nonnegative=True)
        _check_float("lambda_lr", self.lambda_lr, nonnegative=True)
        _check_float("lambda_init", self.lambda_init, nonnegative=True)
        _check_float("entropy_target", self.entropy_target, allow_none=True)
        _check_float("beta", self.beta, positive=True, allow_none=True)
        check_int("pretrain_epochs", self.pretrain_epochs, 0)
        if self.pretrain_epochs > self.epochs:
            _fail("pretrain_epochs", f"must be <= epochs={self.epochs}, got {self.pretrain_epochs}")

        check_int("seed", self.seed, 0)
        if self.device not in DEVICES and not (isinstance(self.device, str) and self.device.startswith("cuda:")):
            _fail("device", f"must be one of {', '.join(DEVICES)} or 'cuda:N', got {self.device!r}")
        check_int("num_workers", self.num_workers, 0)
        if self.precision not in PRECISIONS:
            _fail("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("data_on_device", "compile", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be True or False, got {getattr(self, name)!r}")

        hw = image_hw(self.image_size)
        if hw is not None:
            need = 2 ** self.levels
            if min(hw) < need:
                _fail("image_size", f"{hw[0]}x{hw[1]} is too small for a trunk with levels={self.levels} "
                                    f"(needs at least {need} pixels per side); use a larger image_size or fewer levels")
            channels = _KNOWN_CHANNELS.get(self.dataset)
            if channels is not None and self.head != "diagonal":
                check_rank(self.rank, channels * hw[0] * hw[1])

    # -- presets and (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """The named preset (``smoke`` | ``cpu`` | ``paper``) with keyword overrides applied.

        A preset that pre-trains the mean states it as a fraction of the epochs (cpu: the first quarter), so
        ``epochs`` may be changed freely: ``pretrain_epochs = floor(fraction · epochs)`` unless ``pretrain_epochs``
        is given, which then wins (and must be <= epochs).
        """
        fields = preset_fields(name)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            _fail(unknown[0], f"is not a TrainConfig field (fields: {', '.join(f.name for f in dataclasses.fields(cls))})")
        fields.update(overrides)
        fraction = _PRETRAIN_FRACTION.get(name)
        if fraction is not None and "pretrain_epochs" not in overrides:
            epochs = fields.get("epochs", cls.epochs)
            if isinstance(epochs, int) and not isinstance(epochs, bool):  # else the field check below names it
                fields["pretrain_epochs"] = int(fraction * epochs)
        return cls(**fields)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["image_size"], tuple):
            d["image_size"] = list(d["image_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            _fail(unknown[0], "is not a TrainConfig field")
        return cls(**d)


def preset_fields(name: str) -> dict[str, Any]:
    """The fields the preset ``name`` sets explicitly (a copy; fields it does not list keep their defaults, and
    a pre-training fraction is applied by `TrainConfig.preset`)."""
    if name not in PRESETS:
        _fail("preset", f"must be one of {', '.join(PRESETS)}, got {name!r}")
    return dict(_PRESETS[name])


def check_mapping(name: str, value: Any, example: str) -> dict[str, Any]:
    """``value`` as a dict if it is a mapping with string keys; otherwise one ValueError naming the parameter.
    For notebook parameters: ``papermill -p NAME "a=1"`` passes a string, ``-y "NAME: {a: 1}"`` a mapping."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _fail(name, f"must be a dict of names to values, e.g. {example} (with papermill: -y \"{name}: "
                    f"{example.replace(chr(34), '')}\"), got the {type(value).__name__} {value!r}")
    return dict(value)


def check_rank(rank: int, dim: int) -> None:
    """Raise unless 1 <= rank < dim (a rank-D factor would make the diagonal pointless and K as large as Σ)."""
    if not 1 <= rank < dim:
        _fail("rank", f"must satisfy 1 <= rank < D = C*H*W = {dim}, got {rank}")


# Mean pre-training as a fraction of the epochs, per preset (see TrainConfig.preset). cpu: the first quarter,
# else a lowrank μ stays grey and P carries the whole image.
_PRETRAIN_FRACTION: dict[str, float] = {"cpu": 0.25}

_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(image_size=16, max_items=32, width=4, levels=2, latent=4, rank=2, epochs=1, batch_size=8,
                  lr=1e-3, target_kl=5.0),
    "cpu": dict(width=16, levels=3, latent=32, rank=25, epochs=40, batch_size=25, lr=1e-3, target_kl=30.0),
    # the authors' network block for block (arch "authors": 64 channels at full resolution, 3 stride-2 stages)
    "paper": dict(dataset="celeba", image_size=(218, 178), augment=True, arch="authors", width=64, levels=3,
                  latent=128, rank=25, epochs=100, batch_size=25, lr=1e-4, target_kl=45.0),
}
