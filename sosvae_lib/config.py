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

`RESUMABLE_FIELDS` are the fields a resumed run may change. `EvalConfig`, beside it, holds how a run is evaluated
(`sosvae_lib.evaluate`), validated the same way, with a preset per reproduction scale (smoke, cpu, gpu, paper).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

# The argument checks live in the bottom layer `sosvae_lib._checks`; re-exported here for older imports.
from ._checks import (DEVICES, PRECISIONS, check_bool, check_device, check_image_size, check_int,  # noqa: F401
                      check_mapping, check_precision, image_hw)
from ._checks import check_float as _check_float
from ._checks import fail as _fail
from .data import dataset_spec
from .heads import head_names, head_spec

PRESETS = ("smoke", "cpu", "paper")
ARCHS = ("resnet", "authors")


def __getattr__(name: str) -> Any:
    if name == "HEADS":  # the registered heads (`sosvae_lib.heads.register_head`), read when asked
        return head_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# The fields a resumed run may change (`sosvae_lib.train` takes them from the new configuration; every other field
# must match the checkpoint, and ``epochs`` may not fall below the epochs already trained). The one list: the
# trainer checks a resumption against it and `sosvae_lib.runs.Run.state` calls a run "stale" by it, so a run that
# ``train --resume`` accepts is never thrown away as stale.
RESUMABLE_FIELDS = ("epochs", "device", "num_workers", "root", "data_on_device", "compile", "deterministic")

# What a command reports as a usage error (one line, exit code 2): bad values, paths that do not exist or cannot
# be written, a run directory that is taken, a damaged checkpoint. Anything else is a failure of the run itself.
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Build with `TrainConfig(...)` or `TrainConfig.preset(name, ...)`.

    Data: ``dataset`` (a registered dataset, `sosvae_lib.data.dataset_names`), ``root`` (data folder or None), ``image_size``
    (int, (H, W) or None for the dataset's default), ``max_items`` (deterministic train subset size or None),
    ``augment`` (None = dataset default), ``dequantize`` (add U(0, 1/256) noise to training images, the usual
    convention for a continuous density on 8-bit data).

    Model: ``arch`` the encoder and decoder trunk (``resnet``: this project's light pre-activation ResNet;
    ``authors``: the authors' network block for block, see `sosvae_lib.encoder`); ``head`` a registered head (``HEADS``, `sosvae_lib.heads.head_names`); ``rank``
    R of the covariance factor (ignored by a head without a factor, e.g. ``diagonal``); ``latent`` size; ``width`` (channels of the
    full-resolution stage; each of ``levels`` stride-2 stages doubles it, capped at ``max_width``); ``eps`` the fixed diagonal of ``lowrank`` and the variance floor of the learned-diagonal
    heads; ``init_var`` the initial variance of the learned-diagonal heads.

    Objective (METHOD.md §4): ``target_kl`` T per image, ``damping`` c, ``lambda_lr`` η, ``lambda_init`` λ₀;
    ``entropy_target`` (nats per image, or None) adds a second damped constraint on the entropy of p(x|z);
    ``beta`` (or None) replaces the constrained objective by the β-ELBO NLL + β·KL; ``pretrain_epochs`` freezes the
    observation-noise head (P and d) for the first epochs. ``init_from`` (a finished run's folder, or None) starts
    the run from that run's encoder, trunk and mean-head weights (a mean pre-training shared by several heads):
    the observation-noise head starts from ``seed``, Adam starts afresh, and λ is carried over only from a run of
    the same head; the source must have the same dataset, image size, arch, latent, width, levels and max_width
    (`sosvae_lib.train.train` checks it before any data is loaded, and stores the path absolute).

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
    init_from: str | None = None

    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    precision: str = "auto"
    data_on_device: bool = False
    compile: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        dataset = dataset_spec(self.dataset)  # a registered name (`sosvae_lib.data.register_dataset`)
        if self.root is not None and not isinstance(self.root, str):
            _fail("root", f"must be a path string or None, got {self.root!r}")
        # an int, an (H, W) tuple (a JSON round trip gives a list) or None; "64" / "218x178" as typed
        object.__setattr__(self, "image_size", check_image_size(self.image_size))
        check_int("max_items", self.max_items, 1, allow_none=True)
        check_bool("augment", self.augment, allow_none=True)
        check_bool("dequantize", self.dequantize)

        if self.arch not in ARCHS:
            _fail("arch", f"must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        head = head_spec(self.head)  # a registered head (`sosvae_lib.heads.register_head`)
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
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            _fail("init_from", f"must be the folder of a finished run (a path string) or None, got {self.init_from!r}")

        check_int("seed", self.seed, 0)
        check_device("device", self.device)
        check_int("num_workers", self.num_workers, 0)
        check_precision("precision", self.precision)
        for name in ("data_on_device", "compile", "deterministic"):
            check_bool(name, getattr(self, name))

        hw = image_hw(self.image_size)
        if hw is not None:
            need = 2 ** self.levels
            if min(hw) < need:
                _fail("image_size", f"{hw[0]}x{hw[1]} is too small for a trunk with levels={self.levels} "
                                    f"(needs at least {need} pixels per side); use a larger image_size or fewer levels")
            # datasets whose channels are known without loading them: reject rank >= D now (the model re-checks
            # against the real image shape for every dataset)
            if dataset.channels is not None and head.has_factor:
                check_rank(self.rank, dataset.channels * hw[0] * hw[1])

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


EVAL_PRESETS = ("smoke", "cpu", "gpu", "paper")


@dataclass(frozen=True)
class EvalConfig:
    """How a trained run is evaluated (`sosvae_lib.evaluate.evaluate`). Build with `EvalConfig(...)` or
    `EvalConfig.preset(scale, ...)`; validated when built, each bad value one error starting with the field's name.

    Cost: about ``k`` + 2 decoder passes per test image (k importance samples, the reconstruction, one prior draw);
    a cpu-preset decoder pass takes ~20 ms per image on 2 busy CPU cores. The defaults keep a cpu-preset run under
    ~10 s on orl (40 test images) and under a minute on the capped fashion-mnist / celeba test sets (200 images);
    raise ``k`` / ``num_images`` for tighter numbers.

    Fields: ``k`` importance samples of the IWAE bound (reported as iwae_k); ``num_images`` test images scored (the
    data set's deterministic max_items subset; None = the whole split); ``num_samples`` prior draws for the
    generation metrics (None = as many as test images scored, at most 500); ``batch_size`` images per forward pass;
    ``patch`` side of the revealed square of the inpainting metrics (None = 10, capped at half the image); ``seed``
    of the dequantisation noise, importance samples, patch positions and prior draws; ``pca`` also score the PPCA
    baseline of the same rank (keys prefixed "pca_"); ``pca_train_items`` training images fitting it
    (deterministic subset); ``dequantize`` (None: as the run was trained, `TrainConfig.dequantize`, and only for
    quantised data, `sosvae_lib.runs.data_bits`); ``calibrate`` fit the diagonal scale of a low-rank head on the
    val split (`sosvae_lib.calibration`); ``calibration_images`` val images for it (None = as many as
    ``num_images``); ``faces`` face metrics of 3-channel data when facenet-pytorch is installed
    (`sosvae_lib.faces`); ``face_images`` generated means, samples and real test images given to the face
    detector (~0.01 s each on a CPU; more prior draws and test images than ``num_samples`` / ``num_images`` are
    taken when needed);
    ``device`` "cpu", "cuda", "cuda:N" or "auto"; ``root`` the data folder (None = the one the run was trained on;
    give it when the data moved); ``progress`` tqdm bars on stderr; ``write`` store the results and the calibration
    in the run folder (`sosvae_lib.runs.Run.write_evaluation`).
    """

    k: int = 8
    num_images: int | None = 200
    num_samples: int | None = None
    batch_size: int = 50
    patch: int | None = None
    seed: int = 0
    pca: bool = True
    pca_train_items: int = 2000
    dequantize: bool | None = None
    calibrate: bool = True
    calibration_images: int | None = None
    faces: bool = True
    face_images: int = 100
    device: str = "cpu"
    root: str | None = None
    progress: bool = True
    write: bool = True

    def __post_init__(self) -> None:
        for name in ("k", "batch_size", "pca_train_items"):
            check_int(name, getattr(self, name), 1)
        for name in ("num_images", "num_samples", "calibration_images", "patch"):
            check_int(name, getattr(self, name), 1, allow_none=True)
        check_int("face_images", self.face_images, 2)
        check_int("seed", self.seed, 0)
        for name in ("pca", "progress", "write", "calibrate", "faces"):
            check_bool(name, getattr(self, name))
        check_bool("dequantize", self.dequantize, allow_none=True)
        check_device("device", self.device)
        if isinstance(self.root, os.PathLike):
            object.__setattr__(self, "root", os.fspath(self.root))
        if self.root is not None and not isinstance(self.root, str):
            raise TypeError(f"root: must be a folder (str or Path) or None, got {type(self.root).__name__}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "EvalConfig":
        """The evaluation of the reproduction scale ``name`` (``smoke`` | ``cpu`` | ``gpu`` | ``paper``, as
        `sosvae_lib.reproduce` runs it; progress bars off) with keyword overrides applied."""
        if name not in EVAL_PRESETS:
            _fail("preset", f"must be one of {', '.join(EVAL_PRESETS)}, got {name!r}")
        return cls().replace(**{**_EVAL_PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "EvalConfig":
        """A copy with some fields changed (validated again); an unknown name is a ValueError naming it."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            _fail(unknown[0], f"is not an EvalConfig field (fields: {', '.join(fields)})")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalConfig":
        return cls().replace(**d)


_EVAL_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(k=2, num_images=16, num_samples=16, batch_size=16, patch=6, pca_train_items=32, progress=False),
    "cpu": dict(k=8, num_images=200, batch_size=50, patch=10, pca_train_items=2000, face_images=512, progress=False),
    "gpu": dict(k=64, num_images=1000, batch_size=50, patch=10, pca_train_items=5000, face_images=1000, device="auto",
                progress=False),
    "paper": dict(k=64, num_images=1000, batch_size=25, patch=10, pca_train_items=2000, device="auto",
                  progress=False),
}
