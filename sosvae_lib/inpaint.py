"""Real inpainting with SOS-VAE: fill the hidden pixels of an image from its observed ones, without any hidden pixel
ever reaching the model (Langley et al., "Structured Uncertainty in the Observation Space of Variational
Autoencoders", TMLR 2022; issue 19).

The paper's editor conditions p(x | z) on edited pixels with z taken from the *whole* image (a correction of a
reconstruction; `sosvae_lib.metrics.inpaint`). A user with a missing region has no such z. Here, for images x, an
observed mask O (H = the hidden rest) and a fill image f (the training mean):

(a) **Fill and encode.** x̂ = x on O, f on H; z = m(x̂), the posterior mean of q(z | x̂). ``rounds`` more times:
    x̂ ← x on O, E[x_H | x_O, z] on H (the conditional mean of (c)); z ← m(x̂).
(b) **Fit z to the observed pixels** (``steps`` > 0): maximise the log joint log p(x_O | z) + log N(z; 0, I) over z
    only, with Adam (learning rate ``lr``, ``steps`` steps from the z of (a), deterministic), keeping for each image
    the iterate of highest log joint (so it never ends below its start). p(x_O | z) is the exact marginal of the
    observed pixels, N(μ_O, P_O P_Oᵀ + diag d_O): the factor's rows on O only (`observed_marginal`).
(c) **Condition.** p(x_H | x_O, z) by `LowRankNormal.condition` (Gaussian conditioning, low-rank plus diagonal
    again; for `DiagonalNormal` just μ_H, d_H): its mean is the inpainting, its samples are plausible completions,
    and −log p(x_H | x_O, z) of the true hidden pixels scores it.

A calibrated diagonal (``diag_scale`` s, `sosvae_lib.calibration`: Σ = PPᵀ + s·diag d) applies to every step: the
model is wrapped by `with_diag_scale` before anything runs. The baselines use the same masks: the training mean
(`fill_only`: f on H) and a model without a latent such as the global PPCA (`inpaint_distribution`: (c) alone).

**Hidden pixels never reach the model**: every entry point first forms x̂ = where(O, x, f) and never reads x again;
the scores (`Inpainted.score`) read the truth separately. Changing (even to NaN) the hidden pixels of x changes no
output bitwise (tests/test_inpaint.py).

Masks are applied by `torch.where` / multiplication, never by boolean indexing, so every image of a batch may hide a
different number of pixels. Images are [B, C, H, W] or flattened [B, D] (D = C·H·W, channel-first); masks and fills
broadcast to the images or are given flattened ([B, D] / [D]).

**Cost per image**, measured on this project's 2-core CPU (2 threads) while other jobs ran on it (load ≈ 5), so an
order of magnitude only (an idle machine is a few times faster; the ratio to one encoder + decoder pass is the
stable part): cpu-preset resnet model (width 16, levels 3, latent 32), R = 25, batches of 10, top-half mask,
calibrated diagonal.

    ======================================  =========  =========  ==========================
    mode                                    1×64×64    3×64×64    encoder + decoder passes
    ======================================  =========  =========  ==========================
    one encoder + decoder pass (reference)  55 ms      185 ms     1
    (a) rounds=0, (c)                       67 ms      220 ms     ≈ 1.2
    (a) rounds=1, (c)                       190 ms     200 ms     ≈ 1–3.5 (noisy)
    (a) rounds=3, (c)                       240 ms     480 ms     ≈ 2.5–4.5
    (a) rounds=0, (b) 20 steps, (c)         2.5 s      3.7 s      ≈ 20–45
    ======================================  =========  =========  ==========================

Each round of (a) is one decoder pass, one conditioning and one encoder pass; each step of (b) one decoder forward
and backward plus the marginal's O(D·R²) likelihood and its analytic gradient. The defaults (`DEFAULT_ROUNDS`,
`DEFAULT_STEPS`) keep the metrics at about the cost of the correction metrics of `sosvae_lib.evaluate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .calibration import Calibration, with_diag_scale
from .distributions import DiagonalNormal, LowRankNormal, deferred_checks
from .metrics import bits_per_dim

__all__ = ["inpaint", "inpaint_distribution", "fill_only", "fill_hidden", "observed_marginal", "log_joint",
           "Inpainted", "HiddenScores", "RealInpaintScores", "REAL_INPAINT_FAMILIES", "DEFAULT_ROUNDS",
           "DEFAULT_STEPS", "DEFAULT_LR", "PanelRow", "figure_masks", "inpaint_panel"]

REAL_INPAINT_FAMILIES = ("top_half", "left_half", "random50", "patch10")
"""The mask families of the real-inpainting metrics (`sosvae_lib.metrics.INPAINT_FAMILIES` less ``patch10_maxvar``,
whose square is placed by the variance of the reconstruction of the whole image, i.e. with the hidden pixels seen)."""

DEFAULT_ROUNDS = 0
"""Re-fill rounds of (a) by default (each costs about one encoder and one decoder pass; on an 8-epoch cpu-preset
``orl`` model they changed z by < 0.02 and no RMSE in the 4th decimal)."""
DEFAULT_STEPS = 0
"""Refinement steps of (b) by default (0: none; each costs one to two encoder + decoder passes; on an 8-epoch
cpu-preset ``orl`` model 20 steps lowered the random50 RMSE 0.098 → 0.092 but raised the others by 0.002–0.012)."""
DEFAULT_LR = 0.05
"""Adam learning rate of (b), in units of the prior's standard deviation."""

_LOG_2PI = math.log(2.0 * math.pi)
_Dist = (LowRankNormal, DiagonalNormal)


# ----------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------

def _check_images(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: must be a floating-point tensor of images [B, C, H, W] or [B, D], got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if x.dim() not in (2, 4) or x.shape[0] < 1:
        raise ValueError(f"x: must be images [B, C, H, W] or flattened [B, D] with B >= 1, got shape {tuple(x.shape)}")
    return x


def _flat_like(t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """t as [B, D] for images x: t broadcasts to x's shape, or (x being [B, C, H, W]) t is already flattened, [D] or
    [B or 1, D]."""
    b, d = x.shape[0], math.prod(x.shape[1:])
    try:
        if torch.broadcast_shapes(t.shape, x.shape) == x.shape:
            return t.expand(x.shape).reshape(b, d)
    except RuntimeError:
        pass
    if x.dim() == 4 and 1 <= t.dim() <= 2 and t.shape[-1] == d and (t.dim() == 1 or t.shape[0] in (1, b)):
        return t.reshape(-1, d).expand(b, d)
    raise ValueError(f"{name}: shape {tuple(t.shape)} does not broadcast to the images {tuple(x.shape)} (nor is it "
                     f"flattened [D] / [B, D] with D = {d})")


def _observed_mask(observed: Any, x: torch.Tensor) -> torch.Tensor:
    """bool [B, D] on x's device: observed (bool, or numbers that are all 0 or 1) broadcast to x and flattened."""
    if not isinstance(observed, torch.Tensor):
        raise TypeError(f"observed: must be a tensor (bool, or 0/1 numbers; 1 = observed), "
                        f"got {type(observed).__name__}")
    if observed.dtype != torch.bool:
        if bool(((observed != 0) & (observed != 1)).any()):
            raise ValueError("observed: a numeric mask must hold only 0 (hidden) and 1 (observed)")
        observed = observed != 0
    return _flat_like(observed, x, "observed").to(x.device)


def _fill_values(fill: Any, x: torch.Tensor, m: torch.Tensor, channels: int) -> torch.Tensor:
    """The fill [B, D] (x's dtype and device): ``fill`` broadcast and flattened, or for None the mean of each image's
    observed pixels per channel (0.5 for a channel with none observed)."""
    b, d = m.shape
    if fill is None:
        xf = torch.where(m, x.reshape(b, d), torch.zeros((), dtype=x.dtype, device=x.device)).reshape(b, channels, -1)
        count = m.reshape(b, channels, -1).sum(-1, keepdim=True)
        mean = xf.sum(-1, keepdim=True) / count.clamp_min(1)
        mean = torch.where(count > 0, mean, torch.full((), 0.5, dtype=x.dtype, device=x.device))
        return mean.expand(b, channels, d // channels).reshape(b, d)
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        fill = torch.tensor(float(fill))
    if not isinstance(fill, torch.Tensor) or not fill.is_floating_point():
        raise TypeError(f"fill: must be None, a number or a floating-point tensor (e.g. the training mean [C, H, W] "
                        f"or [D]), got {type(fill).__name__ if not isinstance(fill, torch.Tensor) else fill.dtype}")
    if not bool(torch.isfinite(fill).all()):
        raise ValueError("fill: has NaN or Inf entries")
    return _flat_like(fill, x, "fill").to(device=x.device, dtype=x.dtype)


def _prepare(x: Any, observed: Any, fill: Any, channels: int, dtype: torch.dtype | None = None):
    """(x̂ [B, D] = x on O and the fill on H, O bool [B, D]): the only place that reads the images' values."""
    x = _check_images(x)
    m = _observed_mask(observed, x)
    b, d = m.shape
    if d % channels:
        raise ValueError(f"x: D = {d} values per image is not a multiple of the model's {channels} channels")
    if bool((m & ~torch.isfinite(x.reshape(b, d))).any()):
        raise ValueError("x: has NaN or Inf entries on observed pixels")
    filled = torch.where(m, x.reshape(b, d), _fill_values(fill, x, m, channels))
    return (filled if dtype is None else filled.to(dtype)), m


def _check_options(rounds: Any, steps: Any, lr: Any) -> None:
    for name, value in (("rounds", rounds), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr: must be a number > 0, got {lr!r}")


def _check_model(model: Any, diag_scale: Any) -> nn.Module:
    """The model to run: ``model`` itself, or wrapped so that ``decode`` has the calibrated diagonal."""
    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))):
        raise TypeError(f"model: must have encode(x) and decode(z) (a sosvae_lib.model.VAE), "
                        f"got {type(model).__name__}")
    if diag_scale is None:
        return model
    if getattr(model, "rank", None) == 0:
        raise ValueError("diag_scale: the pixel-wise diagonal head has no low-rank factor and no calibration; "
                         "pass diag_scale=None")
    number = isinstance(diag_scale, (int, float)) and not isinstance(diag_scale, bool)
    if not isinstance(diag_scale, Calibration) and not (number and 0 < diag_scale < math.inf):
        raise ValueError(f"diag_scale: must be None, a number > 0 or a Calibration, got {diag_scale!r}")
    return with_diag_scale(model, diag_scale)


def _model_layout(model: nn.Module, x: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    """(image shape (C, H, W) the encoder takes, the model's floating dtype)."""
    declared = tuple(getattr(model, "image_shape", None) or ())
    if x.dim() == 4 and declared and tuple(x.shape[1:]) != declared:
        raise ValueError(f"x: images of shape {tuple(x.shape[1:])}, but the model takes {declared}")
    shape = tuple(x.shape[1:]) if x.dim() == 4 else declared
    if len(shape) != 3:
        raise ValueError("x: flattened images [B, D] need a model with image_shape (C, H, W); give x as [B, C, H, W]")
    if x.dim() == 2 and math.prod(shape) != x.shape[1]:
        raise ValueError(f"x: {x.shape[1]} values per image, but the model's images {shape} have {math.prod(shape)}")
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return shape, (param.dtype if param is not None and param.is_floating_point() else x.dtype)


# ----------------------------------------------------------------------------------------------------------
# the observed-pixel marginal and the log joint of (b)
# ----------------------------------------------------------------------------------------------------------

def observed_marginal(dist: LowRankNormal | DiagonalNormal, observed: torch.Tensor) -> LowRankNormal | DiagonalNormal:
    """The marginal of the observed pixels, p(x_O) = N(μ_O, P_O P_Oᵀ + diag d_O), as a distribution over all D
    pixels whose ``log_prob`` scores the observed ones only (hidden entries of the value are never read).

    dist: an unconditioned LowRankNormal / DiagonalNormal, batch [*B]; observed: bool, broadcastable to [*B, D].
    Marginalising a Gaussian keeps the rows of O: the factor's rows on H are zeroed (multiplication) and H is marked
    as fixed pixels, which the distributions exclude from every term (unit variance and zero residual there), so
    log_prob = −½(|O| log 2π + Σ_O log d_i + 2 Σ_j log L_jj + maha) with K_O = I + A_OᵀA_O = L Lᵀ — the same
    sum-of-squares code as every other likelihood, differentiable in μ, P and d.
    """
    if not isinstance(dist, _Dist):
        raise TypeError(f"dist: must be a LowRankNormal or DiagonalNormal, got {type(dist).__name__}")
    if dist.observed is not None:
        raise ValueError("dist: is already a conditional; take the marginal of the unconditioned distribution")
    if not isinstance(observed, torch.Tensor) or observed.dtype != torch.bool:
        raise TypeError("observed: must be a bool tensor [..., D] (True = observed)")
    try:
        hidden = ~observed.expand(*dist.batch_shape, dist.D)
    except RuntimeError:
        raise ValueError(f"observed: shape {tuple(observed.shape)} does not broadcast to the distribution's "
                         f"{tuple(dist.batch_shape) + (dist.D,)}") from None
    if isinstance(dist, DiagonalNormal):
        return DiagonalNormal(dist.loc, dist.cov_diag, _observed=hidden)
    factor = dist.cov_factor * (~hidden).to(dist.cov_factor.dtype).unsqueeze(-1)
    return LowRankNormal(dist.loc, factor, dist.cov_diag, _observed=hidden)


def log_joint(model: nn.Module, z: torch.Tensor, filled: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """[B] log p(x_O | z) + log N(z; 0, I) in nats (float64), for z [B, L], images ``filled`` [B, D] (only their
    observed entries are read) and observed bool [B, D]. Differentiable in z."""
    return _log_joint(model.decode(z), z, filled, observed)


def _log_joint(dist: Any, z: torch.Tensor, filled: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """`log_joint` for dist = p(x | z) already decoded: log p(x_O | z) − ½(‖z‖² + L log 2π)."""
    lp = observed_marginal(dist, observed).log_prob(filled.to(dist.loc.dtype)).double()
    return lp - 0.5 * (z.double().square().sum(-1) + z.shape[-1] * _LOG_2PI)


def _refine(model: nn.Module, z0: torch.Tensor, filled: torch.Tensor, m: torch.Tensor, steps: int,
            lr: float) -> torch.Tensor:
    """(b): ``steps`` Adam steps on z maximising `log_joint`, the best iterate of each image kept. Images are
    independent (Adam is elementwise and the loss is a sum over images), so the batch changes no image's answer."""
    best_z = z0.detach().clone()
    if steps == 0:
        return best_z
    z = best_z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    best = torch.full((z.shape[0],), -math.inf, dtype=torch.float64, device=z.device)
    with torch.enable_grad(), deferred_checks():  # a failed step is a non-finite objective, never kept
        for step in range(steps + 1):
            last = step == steps
            with torch.set_grad_enabled(not last):
                obj = log_joint(model, z, filled, m)
            value = obj.detach()
            better = value > best  # NaN compares False
            best = torch.where(better, value, best)
            best_z = torch.where(better.unsqueeze(-1), z.detach(), best_z)
            if last:
                break
            (grad,) = torch.autograd.grad(-obj.sum(), z)
            z.grad = grad
            opt.step()
    return best_z


# ----------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HiddenScores:
    """Scores of an inpainting against the true images, per image [B]: ``sq_err`` Σ_H (x − mean)² (float64),
    ``nll`` −log p(x_H | x_O, z) in nats (float64; None for the training-mean fill, which is no distribution),
    ``num_hidden`` |H| (int64). Pool over images as √(Σ sq_err / Σ num_hidden) and
    `sosvae_lib.metrics.bits_per_dim`(Σ nll, Σ num_hidden)."""

    sq_err: torch.Tensor
    nll: torch.Tensor | None
    num_hidden: torch.Tensor


@dataclass
class Inpainted:
    """An inpainting of B images. ``mean``: x on O, the conditional mean on H (shape of the input images);
    ``observed`` bool [B, D]; ``conditional``: p(x | x_O, z), batch [B] over D (observed pixels fixed), or None for
    `fill_only`; ``z`` [B, L] the latent used (None without a latent). `log_joint` (lazy): the objective of (b),
    log p(x_O | z) + log N(z; 0, I) [B], float64."""

    mean: torch.Tensor
    observed: torch.Tensor
    conditional: LowRankNormal | DiagonalNormal | None = None
    z: torch.Tensor | None = None
    _decoded: Any = field(default=None, repr=False)

    @property
    def log_joint(self) -> torch.Tensor | None:
        if self._decoded is None or self.z is None:
            return None
        if not hasattr(self, "_log_joint"):
            self._log_joint = _log_joint(self._decoded, self.z, self.mean.reshape(self.observed.shape), self.observed)
        return self._log_joint

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[num_samples, *mean.shape] draws of p(x_H | x_O, z), x_O on O exactly. Noises come from ``generator``
        (on its own device, then moved) or the global generator."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: must be an integer >= 1, got {num_samples!r}")
        cond = self.conditional
        if cond is None:
            raise ValueError("num_samples: a training-mean fill is not a distribution and has no samples")
        loc = cond.loc
        b, d = self.observed.shape
        gdev = generator.device if generator is not None else loc.device

        def noise(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator, dtype=loc.dtype, device=gdev).to(loc.device)

        eps_r = noise(num_samples, b, cond.rank) if cond.rank else None
        draws = cond.from_noise(eps_r, noise(num_samples, b, d))
        flat = self.mean.reshape(b, d).to(draws.dtype)
        return torch.where(self.observed, flat, draws).reshape(num_samples, *self.mean.shape)

    def score(self, truth: torch.Tensor) -> HiddenScores:
        """Squared error and NLL of the true images ``truth`` (shape of the input, or [B, D]) on the hidden pixels;
        pass the dequantised images for the bits-per-dimension convention of `sosvae_lib.metrics`."""
        b, d = self.observed.shape
        truth = _check_images(truth)
        if truth.numel() != b * d:
            raise ValueError(f"truth: must hold the {b} images of {d} values that were inpainted, "
                             f"got {tuple(truth.shape)}")
        t = truth.reshape(b, d).to(self.mean.device)
        hidden = ~self.observed
        diff = t.double() - self.mean.reshape(b, d).double()
        sq = torch.where(hidden, diff.square(), torch.zeros((), dtype=torch.float64, device=t.device)).sum(-1)
        nll = None
        if self.conditional is not None:
            nll = -self.conditional.log_prob(t.to(self.conditional.loc.dtype)).double()
        return HiddenScores(sq_err=sq, nll=nll, num_hidden=hidden.sum(-1))


# ----------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------

def fill_hidden(x: torch.Tensor, observed: torch.Tensor, fill: torch.Tensor | float | None = None) -> torch.Tensor:
    """x on the observed pixels, ``fill`` on the hidden ones (shape of x). ``fill``: broadcastable to x or flattened
    ([D] / [B, D]); None: each image's mean over its observed pixels, per channel (x [B, C, H, W]) or overall
    (x [B, D])."""
    x = _check_images(x)
    filled, _ = _prepare(x, observed, fill, x.shape[1] if x.dim() == 4 else 1)
    return filled.reshape(x.shape)


def fill_only(x: torch.Tensor, observed: torch.Tensor, fill: torch.Tensor | float | None = None) -> Inpainted:
    """The training-mean floor: the hidden pixels predicted by ``fill`` (see `fill_hidden`), no distribution."""
    x = _check_images(x)
    filled, m = _prepare(x, observed, fill, x.shape[1] if x.dim() == 4 else 1)
    return Inpainted(mean=filled.reshape(x.shape), observed=m)


@torch.no_grad()
def inpaint_distribution(dist: LowRankNormal | DiagonalNormal, x: torch.Tensor, observed: torch.Tensor) -> Inpainted:
    """(c) alone for a model without a latent (the global PPCA, `sosvae_lib.pca.PCAModel.distribution`): dist with
    batch [] or [B] over D, conditioned on the observed pixels of x."""
    if not isinstance(dist, _Dist):
        raise TypeError(f"dist: must be a LowRankNormal or DiagonalNormal, got {type(dist).__name__}")
    x = _check_images(x)
    out_shape = tuple(x.shape)
    filled, m = _prepare(x, observed, 0.0, 1, dtype=dist.loc.dtype)
    del x  # from here on only x on O (0 on H) exists
    cond = dist.condition(m, filled)
    mean = torch.where(m, filled, cond.loc)
    return Inpainted(mean=mean.reshape(out_shape), observed=m, conditional=cond)


@torch.no_grad()
def inpaint(model: nn.Module, x: torch.Tensor, observed: torch.Tensor, *, fill: torch.Tensor | float | None = None,
            rounds: int = DEFAULT_ROUNDS, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
            diag_scale: float | Calibration | None = None) -> Inpainted:
    """Inpaint images x [B, C, H, W] (or [B, D]) of which only the pixels ``observed`` (bool or 0/1, broadcastable to
    x or flattened [B, D] / [D]; 1 = observed) are known: (a) encode x with its hidden pixels replaced by ``fill``
    (the training mean [C, H, W] / [D]; None: each image's observed mean per channel) and ``rounds`` re-fills with the
    conditional mean, (b) ``steps`` Adam steps of learning rate ``lr`` on z maximising log p(x_O | z) + log p(z),
    (c) condition p(x | z) on x_O (see the module docstring). ``diag_scale``: the calibrated multiplier of the
    diagonal (a number or a `Calibration`; low-rank heads only), used in every step. Works on the model's device
    (masks and fill are moved there); put the model in eval mode first (BatchNorm of arch ``authors``)."""
    model = _check_model(model, diag_scale)
    _check_options(rounds, steps, lr)
    x = _check_images(x)
    image_shape, dtype = _model_layout(model, x)
    out_shape = tuple(x.shape)
    filled, m = _prepare(x, observed, fill, image_shape[0], dtype=dtype)
    del x  # from here on only x̂ = x on O, fill on H exists
    b = filled.shape[0]

    def encode(images: torch.Tensor) -> torch.Tensor:
        return model.encode(images.reshape(b, *image_shape)).loc

    z = encode(filled)
    for _ in range(rounds):
        cond = model.decode(z).condition(m, filled)
        z = encode(torch.where(m, filled, cond.loc))
    z = _refine(model, z, filled, m, steps, lr)
    dist = model.decode(z)
    cond = dist.condition(m, filled)
    mean = torch.where(m, filled, cond.loc)
    return Inpainted(mean=mean.reshape(out_shape), observed=m, conditional=cond, z=z, _decoded=dist)


# ----------------------------------------------------------------------------------------------------------
# the metrics of issue 19
# ----------------------------------------------------------------------------------------------------------

class RealInpaintScores:
    """Running sums of the real-inpainting metrics over batches of test images, for every family of
    `REAL_INPAINT_FAMILIES`; `result` gives ``real_inpaint_rmse_{family}`` (RMSE over all hidden pixels of all images),
    ``real_inpaint_nll_bpd_{family}`` (−log p(x_H | x_O, z) pooled over hidden dimensions, bits per dimension as in
    `sosvae_lib.metrics`) and ``real_inpaint_rmse_{family}_train_mean`` (the fill on the same masks: the floor).
    ``rounds``, ``steps``, ``lr``: the inference of z (see `inpaint`)."""

    def __init__(self, *, rounds: int = DEFAULT_ROUNDS, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                 families: tuple[str, ...] = REAL_INPAINT_FAMILIES):
        _check_options(rounds, steps, lr)
        if not families or any(not isinstance(f, str) for f in families):
            raise ValueError(f"families: must be a non-empty tuple of mask family names, got {families!r}")
        self.options = dict(rounds=rounds, steps=steps, lr=lr)
        self.families = tuple(families)
        self._sums: dict[str, list] = {}

    def add(self, source: Any, x: torch.Tensor, masks: Mapping[str, torch.Tensor], fill: torch.Tensor | float,
            *, diag_scale: float | Calibration | None = None) -> None:
        """Score one batch. source: a VAE (z inferred as in `inpaint`) or a LowRankNormal / DiagonalNormal with batch
        [B] or [] (no latent: the PPCA rows). x [B, C, H, W] or [B, D]: the images, both the observed pixels given to
        the model and the truth scored on H (pass the dequantised images to follow the bits-per-dimension
        convention). masks {family: observed [B, D] bool} (evaluate's masks; extra families are ignored). fill: the
        training mean ([C, H, W] or [D]), for (a) and for the floor. diag_scale: see `inpaint` (models only)."""
        missing = [f for f in self.families if f not in masks]
        if missing:
            raise ValueError(f"masks: missing the families {missing} (need {list(self.families)})")
        is_dist = isinstance(source, _Dist)
        if is_dist and diag_scale is not None:
            raise ValueError("diag_scale: applies to a model; rescale the distribution itself "
                             "(sosvae_lib.calibration.rescale_diagonal)")
        for family in self.families:
            mask = masks[family]
            res = (inpaint_distribution(source, x, mask) if is_dist
                   else inpaint(source, x, mask, fill=fill, diag_scale=diag_scale, **self.options))
            s = res.score(x)
            floor = fill_only(x, mask, fill).score(x)
            parts = (s.sq_err.sum(), s.nll.sum(), floor.sq_err.sum(), s.num_hidden.sum())
            acc = self._sums.get(family)
            self._sums[family] = list(parts) if acc is None else [a + p for a, p in zip(acc, parts)]

    def result(self, bits: int = 8) -> dict[str, float]:
        """{key: value} for every family (one host read-back per number); the NLL in bits per dimension of data
        quantised to ``bits`` (`sosvae_lib.metrics.bits_per_dim`; 8 unless the data are 16-bit)."""
        if not self._sums:
            raise ValueError("RealInpaintScores.result: no images were added")
        out: dict[str, float] = {}
        for family in self.families:
            sq, nll, sq_fill, hidden = (float(t) for t in self._sums[family])
            out[f"real_inpaint_rmse_{family}"] = math.sqrt(sq / hidden) if hidden else math.nan
            out[f"real_inpaint_nll_bpd_{family}"] = float(bits_per_dim(nll, hidden, bits=bits)) if hidden else math.nan
            out[f"real_inpaint_rmse_{family}_train_mean"] = math.sqrt(sq_fill / hidden) if hidden else math.nan
        return out


# ----------------------------------------------------------------------------------------------------------
# the real-inpainting figure (notebooks/03_editing)
# ----------------------------------------------------------------------------------------------------------

def figure_masks(image_shape: tuple[int, int, int], patch: int = 10) -> dict[str, torch.Tensor]:
    """The observed masks [D] (bool) of the real-inpainting figure: ``top_half``, ``left_half`` (as the metrics'
    families) and ``patch``: a ``patch``×``patch`` square at the centre of the image (the metrics' ``patch10``
    square is placed at random)."""
    from . import metrics as M

    c, h, w = image_shape
    if isinstance(patch, bool) or not isinstance(patch, int) or not 1 <= patch <= min(h, w):
        raise ValueError(f"patch: must be an integer in [1, {min(h, w)}] for {h}×{w} images, got {patch!r}")
    corner = (torch.tensor([(h - patch) // 2]), torch.tensor([(w - patch) // 2]))
    return dict(top_half=M.half_masks(1, image_shape, "top")[0], left_half=M.half_masks(1, image_shape, "left")[0],
                patch=M.patch_masks(image_shape, *corner, patch)[0])


@dataclass
class PanelRow:
    """One mask of the real-inpainting figure, all [C, H, W] on the CPU: ``truth``; ``observed`` (bool [D]);
    ``means`` {method: the inpainted image (x on O, the prediction on H)}; ``samples`` [n, C, H, W] drawn from the
    conditional of the method ``sampled``; ``rmse`` {method: RMSE on the hidden pixels}."""

    truth: torch.Tensor
    observed: torch.Tensor
    means: dict[str, torch.Tensor]
    samples: torch.Tensor | None
    sampled: str | None
    rmse: dict[str, float]


@torch.no_grad()
def inpaint_panel(x: torch.Tensor, masks: Mapping[str, torch.Tensor], fill: torch.Tensor,
                  models: Mapping[str, nn.Module], *, pca: LowRankNormal | DiagonalNormal | None = None,
                  diag_scales: Mapping[str, float | Calibration | None] | None = None, sampled: str | None = None,
                  num_samples: int = 3, seed: int = 0) -> dict[str, PanelRow]:
    """Real inpainting of one image ``x`` [C, H, W] under each of ``masks`` {name: observed [D] or [C, H, W]} by
    every method: ``pca`` (a distribution without latent, e.g. `sosvae_lib.pca.PCAModel.distribution`, by
    `inpaint_distribution`; listed first), then each of ``models`` {name: VAE} by `inpaint` with ``fill`` (the
    training mean) and its ``diag_scales`` entry, and the training mean itself (``train mean``, `fill_only`).
    ``num_samples`` completions of the model ``sampled`` (default: the last model) come from a CPU generator
    seeded with ``seed`` (`Inpainted.sample`, moved to the model's device). Runs on each model's device; returns
    {mask name: `PanelRow`} on the CPU."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3:
        raise ValueError(f"x: must be one floating-point image [C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not masks:
        raise ValueError("masks: need at least one mask")
    if not models:
        raise ValueError("models: need at least one model")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples: must be an integer >= 0, got {num_samples!r}")
    sampled = list(models)[-1] if sampled is None else sampled
    if sampled not in models:
        raise ValueError(f"sampled: must be one of the models {list(models)}, got {sampled!r}")
    diag_scales = dict(diag_scales or {})
    unknown = sorted(set(diag_scales) - set(models))
    if unknown:
        raise ValueError(f"diag_scales: {unknown[0]!r} is not one of the models {list(models)}")
    batch = x[None]
    out: dict[str, PanelRow] = {}
    for name, mask in masks.items():
        observed = torch.as_tensor(mask).reshape(1, -1).bool()
        results: dict[str, Inpainted] = {}
        if pca is not None:
            results["PPCA"] = inpaint_distribution(pca, batch.to(pca.loc.device, pca.loc.dtype), observed)
        for label, model in models.items():
            device = next(model.parameters()).device
            results[label] = inpaint(model, batch.to(device), observed, fill=fill, diag_scale=diag_scales.get(label))
        results["train mean"] = fill_only(batch, observed, fill)
        samples = None
        if num_samples:
            gen = torch.Generator().manual_seed(seed)
            samples = results[sampled].sample(num_samples, gen)[:, 0].float().cpu()
        rmse = {}
        for label, res in results.items():
            score = res.score(batch.to(res.mean.device))
            rmse[label] = math.sqrt(float(score.sq_err.sum()) / max(1, int(score.num_hidden.sum())))
        out[name] = PanelRow(truth=x.float().cpu(), observed=observed[0].cpu(),
                             means={k: r.mean[0].float().cpu() for k, r in results.items()},
                             samples=samples, sampled=sampled if num_samples else None, rmse=rmse)
    return out
