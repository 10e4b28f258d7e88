"""Calibration of the diagonal of SOS-VAE's observation covariance (Langley et al., "Structured Uncertainty in the
Observation Space of Variational Autoencoders", TMLR 2022).

The paper's head keeps the diagonal fixed at ε = 1e-5, so every residual outside span(P) is scored as nearly
impossible (r²/2ε nats) and test likelihoods are hundreds of bits per dimension. Here one scalar s > 0 rescales
the trained diagonal,

    Σ(s) = P Pᵀ + s · diag(d),

and s is fitted by maximum likelihood on validation reconstructions (z = posterior mean of q(z | x)), all else of
the model fixed. For ``lowrank`` d = ε (a scalar), so the calibrated ε is s·ε; for ``lowrank-diag`` s multiplies
the learned d(z). The pixel-wise ``diagonal`` head is not calibrated here (its variances are learned per pixel);
the PPCA baseline needs none (its σ² is already the maximum-likelihood value on its training set).

The fit is exact and cheap: one pass over the data reduces each image to R + 2 numbers (`DiagScaleStats`),
after which the summed NLL at any s costs O(N·R); a coarse grid on log10 s brackets the minimum and a
golden-section search refines it (`fit_diag_scale`).

Consumers choose the trained or the calibrated diagonal: `rescale_diagonal` (one distribution),
`with_diag_scale` (a model whose ``decode`` returns the calibrated distribution; encode/IWAE/conditioning work
unchanged). This module is the mathematics only: a run's calibration is fitted by `sosvae_lib.evaluate`
(``calibrate_run``) and stored and read by `sosvae_lib.runs.Run` (``write_calibration`` / ``calibration``).
"""

from __future__ import annotations

import math
import warnings
import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .distributions import LowRankNormal
from .heads import has_factor

__all__ = ["DiagScaleStats", "diag_scale_statistics", "fit_diag_scale", "Calibration", "calibrate_diagonal",
           "rescale_diagonal", "with_diag_scale", "DiagScaled", "calibrate_model", "check_calibration_record",
           "check_search", "EPS_BOUNDS", "SCALE_BOUNDS"]

EPS_BOUNDS = (1e-8, 1.0)
"""Default search interval of the calibrated ε itself when the trained diagonal is a scalar (log10 ε ∈ [−8, 0])."""
SCALE_BOUNDS = (1e-4, 1e4)
"""Default search interval of the multiplier s when the trained diagonal is per-pixel (``lowrank-diag``)."""
_LOG_2PI = math.log(2.0 * math.pi)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


# ----------------------------------------------------------------------------------------------------------
# The exact NLL as a function of the scale, from per-image sufficient statistics
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiagScaleStats:
    """What the NLL of images under N(μ, PPᵀ + s·diag(d)) depends on, for every s > 0 (float64, N images):
    ``sq_singular`` [N, R] σ_j² of A = d^{-1/2} ⊙ P; ``sq_coef`` [N, R] c_j² with c = Uᵀ y; ``perp`` [N]
    ‖y − U c‖²; ``log_diag`` [N] Σ_i log d_i; ``dim`` D. See `diag_scale_statistics`."""

    sq_singular: torch.Tensor
    sq_coef: torch.Tensor
    perp: torch.Tensor
    log_diag: torch.Tensor
    dim: int

    @property
    def num_images(self) -> int:
        return int(self.perp.shape[0])

    def nll(self, scale: float | torch.Tensor) -> torch.Tensor:
        """−log N(x; μ, PPᵀ + s·diag d) in nats per image [N] (float64, on the statistics' device), for a scalar
        s > 0:

            ½ [D log 2π + Σ_i log d_i + Σ_j log(σ_j² + s) + (D − R) log s + Σ_j c_j²/(σ_j² + s) + ‖y − Uc‖²/s].
        """
        if isinstance(scale, torch.Tensor):
            s = scale.to(self.perp.device, torch.float64)
            log_s = torch.log(s)
        else:  # a Python number stays one: no tensor to copy to the device
            s = float(scale)
            log_s = math.log(s)
        r = self.sq_singular.shape[-1]
        lam = self.sq_singular + s
        logdet = self.log_diag + torch.log(lam).sum(-1) + (self.dim - r) * log_s
        maha = (self.sq_coef / lam).sum(-1) + self.perp / s
        return 0.5 * (self.dim * _LOG_2PI + logdet + maha)

    def total_nll(self, scale: float) -> float:
        """Σ over images of `nll` (nats)."""
        return float(self.nll(scale).sum())

    def to(self, device: torch.device | str) -> "DiagScaleStats":
        """The same statistics on ``device`` (N·(R + 3) numbers: the search over s runs on the CPU)."""
        return DiagScaleStats(self.sq_singular.to(device), self.sq_coef.to(device), self.perp.to(device),
                              self.log_diag.to(device), self.dim)

    @staticmethod
    def cat(parts: Sequence["DiagScaleStats"]) -> "DiagScaleStats":
        """The statistics of several batches of images as one."""
        if not parts:
            raise ValueError("parts: need at least one DiagScaleStats to concatenate")
        dims = {p.dim for p in parts}
        if len(dims) != 1:
            raise ValueError(f"parts: statistics of different image sizes D {sorted(dims)} cannot be concatenated")
        return DiagScaleStats(torch.cat([p.sq_singular for p in parts]), torch.cat([p.sq_coef for p in parts]),
                              torch.cat([p.perp for p in parts]), torch.cat([p.log_diag for p in parts]),
                              parts[0].dim)


def _is_scalar_diag(cov_diag: torch.Tensor) -> bool:
    """True when cov_diag is one number: a 0-dim / one-element tensor or an expanded view of one (all strides 0,
    as `LowRankNormal.cov_diag` returns for the paper's fixed ε)."""
    return cov_diag.numel() == 1 or (cov_diag.dim() > 0 and all(s == 0 for s in cov_diag.stride()))


def diag_scale_statistics(loc: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor | float,
                          x: torch.Tensor, chunk: int = 16) -> DiagScaleStats:
    """Per-image sufficient statistics of the NLL of x [N, D] under N(loc, PPᵀ + s·diag(d)) as a function of s.

    loc [N, D], cov_factor P [N, D, R] (or [D, R], shared), cov_diag d: a scalar or [N, D] / [D], > 0.
    Spectral form (float64): with A = d^{-1/2} ⊙ P = U S Vᵀ (thin SVD, σ_j = S_jj) and y = d^{-1/2} ⊙ (x − μ),
    Σ(s) = D^{1/2} (AAᵀ + sI) D^{1/2}, so log|Σ(s)| = Σ_i log d_i + Σ_j log(σ_j² + s) + (D − R) log s and
    (x − μ)ᵀ Σ(s)⁻¹ (x − μ) = Σ_j c_j²/(σ_j² + s) + ‖y − Uc‖²/s with c = Uᵀ y. ‖y − Uc‖² is summed directly (not
    ‖y‖² − ‖c‖², which cancels when d is tiny). Rank-deficient P is exact too (σ_j = 0 terms). ``chunk`` images
    per SVD bound the float64 memory (chunk·D·R). Computed on the device of ``cov_factor`` (a number or CPU scalar
    ``cov_diag`` is moved there); every input is checked for NaN / Inf with one host read-back.
    """
    loc, cov_factor, diag, x, scalar = _statistics_args(loc, cov_factor, cov_diag, x, chunk)
    names = ("x", "loc", "cov_factor", "cov_diag")
    ok = torch.stack([torch.isfinite(x).all(), torch.isfinite(loc).all(), torch.isfinite(cov_factor).all(),
                      (torch.isfinite(diag) & (diag > 0)).all()]).tolist()
    for name, good in zip(names, ok):
        if not good:
            raise ValueError(f"{name}: must be finite{' and > 0 (variances)' if name == 'cov_diag' else ''}; "
                             f"it has NaN, Inf{' or entries <= 0' if name == 'cov_diag' else ''} entries")
    return _statistics(loc, cov_factor, diag, x, chunk, scalar)


def _statistics_args(loc, cov_factor, cov_diag, x, chunk):
    """The checked shapes of `diag_scale_statistics`' arguments: (loc [N, D], factor [N, D, R], diag float64 on the
    factor's device (0-dim when scalar), x [N, D], scalar)."""
    if not isinstance(cov_factor, torch.Tensor):
        raise TypeError(f"cov_factor: must be a tensor [N, D, R] or [D, R], got {type(cov_factor).__name__}")
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"x: must be flattened images [N, D], got shape {tuple(x.shape)}")
    n, d = x.shape
    loc = torch.as_tensor(loc)
    if loc.shape[-1:] != (d,):
        raise ValueError(f"loc: must be [N, D] = [{n}, {d}] or [D], got {tuple(loc.shape)}")
    loc = loc.expand(n, d)
    if cov_factor.dim() == 2:
        cov_factor = cov_factor.expand(n, *cov_factor.shape)
    if cov_factor.dim() != 3 or cov_factor.shape[:2] != (n, d):
        raise ValueError(f"cov_factor: must be [N, D, R] = [{n}, {d}, R] or [D, R], got {tuple(cov_factor.shape)}")
    diag = cov_diag if isinstance(cov_diag, torch.Tensor) else torch.as_tensor(cov_diag, dtype=torch.float64)
    scalar = _is_scalar_diag(diag)  # before a copy to float64 makes an expanded view dense
    if scalar:
        diag = diag.reshape(-1)[0]
    diag = diag.to(cov_factor.device, torch.float64)
    if not scalar and diag.shape[-1] != d:
        raise ValueError(f"cov_diag: must be a scalar or [N, {d}] / [{d}], got {tuple(diag.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: must be an integer >= 1, got {chunk!r}")
    return loc, cov_factor, diag, x, scalar


def _statistics(loc: torch.Tensor, cov_factor: torch.Tensor, diag: torch.Tensor, x: torch.Tensor, chunk: int,
                scalar: bool) -> DiagScaleStats:
    """`diag_scale_statistics` of checked arguments, without reading anything back from the device."""
    n, d = x.shape
    sq_sing, sq_coef, perp, log_diag = [], [], [], []
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        b = x[sl].shape[0]
        dd = diag if scalar else diag.expand(n, d)[sl]
        w = dd.rsqrt()
        a = cov_factor[sl].double() * (w.unsqueeze(-1) if not scalar else w)
        y = (x[sl].double() - loc[sl].double()) * w
        u, s, _ = torch.linalg.svd(a, full_matrices=False)  # u [b, D, R]
        c = (u.mT @ y.unsqueeze(-1)).squeeze(-1)
        sq_sing.append(s.square())
        sq_coef.append(c.square())
        perp.append((y - (u @ c.unsqueeze(-1)).squeeze(-1)).square().sum(-1))
        log_diag.append((d * torch.log(dd)).expand(b) if scalar else torch.log(dd).sum(-1))
    return DiagScaleStats(torch.cat(sq_sing), torch.cat(sq_coef), torch.cat(perp), torch.cat(log_diag), d)


def check_search(bounds: Any, grid: Any, tol: Any) -> tuple[float, float]:
    """(low, high) of checked search settings (`fit_diag_scale`); a ValueError naming ``bounds``, ``grid`` or ``tol``
    as given."""
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds: must be two numbers (low, high) with 0 < low < high < inf, got {bounds!r}") from None
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds: must be (low, high) with 0 < low < high < inf, got {bounds!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 3:
        raise ValueError(f"grid: must be an integer >= 3, got {grid!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol: must be a number > 0 (decades), got {tol!r}")
    return lo, hi


def fit_diag_scale(stats: DiagScaleStats, bounds: tuple[float, float] = SCALE_BOUNDS, grid: int = 33,
                   tol: float = 1e-4) -> tuple[float, bool]:
    """The s ∈ [bounds] minimising Σ_images `DiagScaleStats.nll`(s), searched on t = log10 s: the best of ``grid``
    equally spaced t brackets the minimum between its neighbours, then golden-section search narrows that
    bracket to ``tol`` decades. Returns (s, at_bound), at_bound True when the minimum is at an end of ``bounds``
    (widen them). The search reads `DiagScaleStats.nll` back once per evaluated s: give statistics on the CPU
    (`DiagScaleStats.to`) when they were computed on a GPU."""
    lo, hi = check_search(bounds, grid, tol)
    t_lo, t_hi = math.log10(lo), math.log10(hi)
    ts = torch.linspace(t_lo, t_hi, grid, dtype=torch.float64)

    def f(t: float) -> float:
        return stats.total_nll(10.0 ** t)

    values = [f(float(t)) for t in ts]
    i = min(range(grid), key=values.__getitem__)
    a, b = float(ts[max(i - 1, 0)]), float(ts[min(i + 1, grid - 1)])
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    t_best, f_best = min(((c, fc), (d, fd), (float(ts[i]), values[i])), key=lambda p: p[1])
    at_bound = (i == 0 and t_best - t_lo < 2 * tol) or (i == grid - 1 and t_hi - t_best < 2 * tol)
    return 10.0 ** t_best, bool(at_bound)


@dataclass(frozen=True)
class Calibration:
    """A fitted diagonal scale. ``scale`` s multiplies the trained diagonal; ``eps`` = s·ε when that diagonal is
    a scalar ε (``lowrank``), else None; ``trained_eps`` ε (or None); ``nll_trained`` / ``nll_calibrated`` mean
    NLL in nats per image of the fitting images at s = 1 and at s; ``num_images``, ``num_dims`` (D);
    ``at_bound`` the minimum lies at an end of the searched interval; ``bits`` the quantisation the bits per
    dimension are stated on (`sosvae_lib.metrics.bits_per_dim`: 8, or 16 for 16-bit data)."""

    scale: float
    eps: float | None
    trained_eps: float | None
    nll_trained: float
    nll_calibrated: float
    num_images: int
    num_dims: int
    at_bound: bool
    bits: int = 8

    @property
    def bpd_trained(self) -> float:
        from .metrics import bits_per_dim
        return float(bits_per_dim(self.nll_trained, self.num_dims, bits=self.bits))

    @property
    def bpd_calibrated(self) -> float:
        from .metrics import bits_per_dim
        return float(bits_per_dim(self.nll_calibrated, self.num_dims, bits=self.bits))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bpd_trained": self.bpd_trained, "bpd_calibrated": self.bpd_calibrated}


def _calibration_from_stats(stats: DiagScaleStats, trained_eps: float | None, bounds: tuple[float, float] | None,
                            grid: int, tol: float) -> Calibration:
    """Fit s; for a scalar diagonal ``bounds`` are on ε = s·trained_eps (default `EPS_BOUNDS`), else on s. The
    statistics are moved to the CPU first (the search reads them back at every step)."""
    if bounds is None:
        bounds = EPS_BOUNDS if trained_eps is not None else SCALE_BOUNDS
    lo, hi = check_search(bounds, grid, tol)  # as given, before it becomes an interval of s
    stats = stats.to("cpu")
    scale_bounds = (lo, hi) if trained_eps is None else (lo / trained_eps, hi / trained_eps)
    scale, at_bound = fit_diag_scale(stats, scale_bounds, grid=grid, tol=tol)
    if at_bound:
        warnings.warn(f"calibration: the fitted diagonal scale {scale:.3g} lies at an end of the searched interval "
                      f"{bounds}; widen bounds", RuntimeWarning, stacklevel=3)
    n = stats.num_images
    return Calibration(scale=scale, eps=None if trained_eps is None else scale * trained_eps, trained_eps=trained_eps,
                       nll_trained=stats.total_nll(1.0) / n, nll_calibrated=stats.total_nll(scale) / n,
                       num_images=n, num_dims=stats.dim, at_bound=at_bound)


def calibrate_diagonal(loc: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor | float,
                       x: torch.Tensor, bounds: tuple[float, float] | None = None, grid: int = 33,
                       tol: float = 1e-4) -> Calibration:
    """Maximum-likelihood scale s of the diagonal for images x [N, D] under N(loc, PPᵀ + s·diag(d)).

    loc [N, D], cov_factor [N, D, R] or [D, R], cov_diag a scalar ε or [N, D] / [D]. ``bounds`` (low, high): the
    searched interval of the calibrated ε itself when cov_diag is a scalar (default `EPS_BOUNDS`, 1e-8 … 1), of the
    multiplier s otherwise (default `SCALE_BOUNDS`, 1e-4 … 1e4). ``grid`` and ``tol``: see `fit_diag_scale`.
    """
    if bounds is not None:
        check_search(bounds, grid, tol)
    diag = torch.as_tensor(cov_diag, dtype=torch.float64)
    trained_eps = float(diag.reshape(-1)[0]) if _is_scalar_diag(diag) else None
    stats = diag_scale_statistics(loc, cov_factor, cov_diag, x)
    return _calibration_from_stats(stats, trained_eps, bounds, grid, tol)


# ----------------------------------------------------------------------------------------------------------
# Using a calibration
# ----------------------------------------------------------------------------------------------------------

def _check_scale(scale: Any) -> float:
    if isinstance(scale, Calibration):
        scale = scale.scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < float(scale) < math.inf:
        raise ValueError(f"scale: must be a number > 0 (or a Calibration), got {scale!r}")
    return float(scale)


def rescale_diagonal(dist: LowRankNormal, scale: float | Calibration) -> LowRankNormal:
    """N(μ, PPᵀ + s·diag(d)) from dist = N(μ, PPᵀ + diag(d)): a new LowRankNormal with the same mean and factor;
    a scalar diagonal stays scalar. ``dist`` must be an unconditioned LowRankNormal (condition the result instead)."""
    s = _check_scale(scale)
    if not isinstance(dist, LowRankNormal):
        raise TypeError(f"dist: calibration applies to a LowRankNormal (the lowrank heads and PPCA), got "
                        f"{type(dist).__name__}")
    if dist.observed is not None:
        raise ValueError("dist: is a conditional; rescale the unconditioned distribution, then condition it")
    diag = dist.cov_diag
    diag = diag.reshape(-1)[0] if _is_scalar_diag(diag) else diag
    return LowRankNormal(dist.loc, dist.cov_factor, diag * s)


class DiagScaled(nn.Module):
    """A VAE whose observation diagonal is multiplied by ``scale``: ``decode(z)`` returns
    `rescale_diagonal`(model.decode(z), scale); ``encode`` and everything else are the wrapped model's. Satisfies
    `sosvae_lib.metrics.LatentModel`, so IWAE, inpainting and the figures take it in place of the model."""

    def __init__(self, model: nn.Module, scale: float | Calibration):
        super().__init__()
        if not has_factor(model):
            raise ValueError("model: the pixel-wise diagonal head has no low-rank factor; calibration applies to "
                             "the lowrank and lowrank-diag heads")
        self.model = model
        self.scale = _check_scale(scale)

    def encode(self, x: torch.Tensor):
        return self.model.encode(x)

    def decode(self, z: torch.Tensor) -> LowRankNormal:
        return rescale_diagonal(self.model.decode(z), self.scale)

    def prior(self, n: int, device=None):
        return self.model.prior(n, device)

    def __getattr__(self, name: str):  # latent_dim, rank, image_shape, dim, head_name, ... of the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def with_diag_scale(model: nn.Module, calibration: float | Calibration | None) -> nn.Module:
    """``model`` itself for None (the trained diagonal), else `DiagScaled`(model, calibration): consumers choose."""
    return model if calibration is None else DiagScaled(model, calibration)


# ----------------------------------------------------------------------------------------------------------
# Fitting a model and a run
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def calibrate_model(model: nn.Module, images: torch.Tensor, *, batch_size: int = 50, dequantize: bool = True,
                    bits: int | None = 8, generator: torch.Generator | None = None,
                    bounds: tuple[float, float] | None = None, grid: int = 33, tol: float = 1e-4) -> Calibration:
    """Fit the diagonal scale of a low-rank VAE on images [N, C, H, W] in [0, 1] (the validation split): the
    reconstructions p(x | z = m(x)), m(x) the posterior mean, score the images, dequantised at ``bits`` (8 or 16;
    None: continuous data, never dequantised) with ``generator`` if ``dequantize``; bits per dimension are stated
    at ``bits`` (8 for continuous data, `sosvae_lib.runs.data_bits`). See `calibrate_diagonal` for ``bounds``,
    ``grid``, ``tol``. One decoder pass per image, on the model's device; the statistics stay there until the
    search (two read-backs in all, not one per batch).
    """
    from .config import check_int
    from .metrics import dequantize as dequantize_fn

    if not has_factor(model):
        raise ValueError("model: the pixel-wise diagonal head has no low-rank factor; calibration applies to the "
                         "lowrank and lowrank-diag heads")
    check_int("batch_size", batch_size, 1)
    if bits not in (8, 16, None):
        raise ValueError(f"bits: must be 8, 16 or None (continuous data), got {bits!r}")
    dequantize = dequantize and bits is not None
    check_search(bounds if bounds is not None else SCALE_BOUNDS, grid, tol)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: must be a tensor [N, C, H, W], got {type(images).__name__}")
    shape = tuple(getattr(model, "image_shape", images.shape[1:]))
    if images.dim() != 4 or tuple(images.shape[1:]) != shape:
        raise ValueError(f"images: must be [N, C, H, W] with (C, H, W) = {shape}, the model's image shape; got "
                         f"{tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images: no images to calibrate on")
    if not images.is_floating_point():
        raise TypeError(f"images: must be floating point in [0, 1], got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images: has NaN or Inf entries; give images in [0, 1]")
    device = next(model.parameters()).device
    parts, first_diag = [], None
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            x_score = dequantize_fn(x, generator, bits=bits) if dequantize else x
            obs = model.decode(model.encode(x).loc)
            loc, factor, diag, flat, scalar = _statistics_args(obs.loc.detach(), obs.cov_factor.detach(),
                                                               obs.cov_diag.detach(), x_score.reshape(x.shape[0], -1),
                                                               16)
            first_diag = diag if first_diag is None else first_diag
            parts.append(_statistics(loc, factor, diag, flat, 16, scalar))
    except torch.linalg.LinAlgError as err:  # an SVD of NaN / Inf (CPU); on a GPU the check below catches it
        raise ValueError(f"model: gives non-finite reconstructions of these images ({str(err).splitlines()[0]}); "
                         f"its weights or outputs hold NaN or Inf") from None
    stats = DiagScaleStats.cat(parts)
    finite = torch.stack([torch.isfinite(t).all() for t in (stats.sq_singular, stats.sq_coef, stats.perp,
                                                           stats.log_diag)]).all()
    if not bool(finite):
        raise ValueError("model: gives non-finite reconstructions or variances on these images; its weights or "
                         "outputs hold NaN or Inf")
    trained_eps = float(first_diag) if first_diag.dim() == 0 else None  # the head's fixed ε (the same in every batch)
    return dataclasses.replace(_calibration_from_stats(stats, trained_eps, bounds, grid, tol), bits=bits or 8)


def check_calibration_record(record: Any, name: str = "calibration", advice: str = "write it again") -> Calibration:
    """The `Calibration` a stored record holds (a dict of `Calibration.to_dict`, possibly with more keys such as
    the split and seed it was fitted with; ``bits`` may be absent, 8). A record with a field missing or a scale
    that is not a number > 0 is a ValueError naming ``name`` (the file) and giving ``advice``."""
    fields = Calibration.__dataclass_fields__
    required = [k for k, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [k for k in required if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"calibration: {name} is incomplete (missing {', '.join(missing)}); {advice}")
    try:
        _check_scale(record["scale"])
    except ValueError:
        raise ValueError(f"calibration: {name} holds scale {record['scale']!r}, not a number > 0; {advice}") from None
    if record.get("bits", 8) not in (8, 16):
        raise ValueError(f"calibration: {name} holds bits {record['bits']!r}, not 8 or 16; {advice}")
    return Calibration(**{k: record[k] for k in fields if k in record})
