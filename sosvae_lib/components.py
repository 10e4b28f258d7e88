"""What the figures of SOS-VAE show, computed as tensors (Langley et al., "Structured Uncertainty in the
Observation Space of Variational Autoencoders", TMLR 2022: the six-row sample figure, the authors' component sweeps
and latent interpolations). Editing (strokes propagated by conditioning, completions) is `sosvae_lib.editing`.

Everything here works on any observation distribution of `sosvae_lib.distributions` (``LowRankNormal``, or
``DiagonalNormal`` whose factor has rank 0) through ``.loc``, ``.cov_factor``, ``.variance``, ``.from_noise``,
``.covariance_row`` and ``.condition`` only, and on any model with ``.decode(z)``, ``.encode(x)``,
``.latent_dim`` and ``.image_shape``. Images are flattened channel-first, ``x.reshape(B, C*H*W)``. Every random
draw comes from an explicit ``torch.Generator`` seeded by the caller, so figures are reproducible and two models
can be shown on the same latent codes and the same noise.

Each computation returns a small dataclass of tensors with ``summary()``: the numbers a notebook records.

Principal directions of P Pᵀ (never forming the D×D matrix): with the R×R Gram matrix G = Pᵀ P = V diag(w) Vᵀ,
P Pᵀ (P v_j) = P G v_j = w_j (P v_j), so u_j = P v_j / √w_j are orthonormal eigenvectors of P Pᵀ with
eigenvalues w_j, and the non-zero spectra of P Pᵀ and Pᵀ P coincide. Moving t standard deviations along u_j is
μ + t √w_j u_j = μ + P (t v_j), i.e. ``from_noise(factor_noise = t·v_j)``; sweeping column j of P is
``from_noise(factor_noise = t·e_j)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .config import check_int
from .metrics import lag1_correlation

Shape = tuple[int, int, int]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(check_int("seed", seed, 0))


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _rank_of(dist: Any) -> int:
    return int(dist.cov_factor.shape[-1])


def draw_noise(dist: Any, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal noises (factor_noise [n, R], diag_noise [n, D]) for ``dist.from_noise``; [R], [D] if n is
    None. Drawn on the CPU from a generator seeded with ``seed`` (the same seed gives the same noise on any
    device), then moved to the distribution's device."""
    g = _generator(seed)
    lead = () if n is None else (n,)
    rank, dim = _rank_of(dist), int(dist.loc.shape[-1])
    eps_r = torch.randn(lead + (rank,), generator=g)
    eps_d = torch.randn(lead + (dim,), generator=g)
    return eps_r.to(dist.loc), eps_d.to(dist.loc)


def prior_latents(latent_dim: int, n: int, seed: int) -> torch.Tensor:
    """n draws z ~ N(0, I) of size ``latent_dim`` from a generator seeded with ``seed``: [n, latent_dim]."""
    return torch.randn(check_int("n", n, 1), check_int("latent_dim", latent_dim, 1), generator=_generator(seed))


# -------------------------------------------------------------------------------------------------------------
# The six-row sample figure
# -------------------------------------------------------------------------------------------------------------

def object_pixel(variance: torch.Tensor, image_shape: Shape, margin: float = 0.25) -> int:
    """A flat pixel index i "on the object": the pixel of the central box (``margin`` of each side left out)
    whose marginal variance, summed over channels and averaged over the images of ``variance`` [N, D], is the
    largest; channel 0 of that pixel. Faces and brains are centred in their images, and their most uncertain
    central pixel is where the covariance row Σ^(i) has the most structure to show."""
    c, h, w = image_shape
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin: must be in [0, 0.5), got {margin!r}")
    v = variance.detach().double().reshape(-1, c, h, w).mean(0).sum(0)  # [H, W]
    r0, r1 = int(h * margin), max(int(h * margin) + 1, h - int(h * margin))
    c0, c1 = int(w * margin), max(int(w * margin) + 1, w - int(w * margin))
    box = v[r0:r1, c0:c1]
    k = int(box.flatten().argmax())
    row, col = r0 + k // box.shape[1], c0 + k % box.shape[1]
    return row * w + col


@dataclass
class PriorPanel:
    """The rows of the paper's sample figure for n prior draws, each [n, D]: ``mean`` μ(z); ``sample`` y;
    ``residual`` y − μ; ``variance`` diag Σ; ``cov_pos`` / ``cov_neg`` the positive part and the magnitude of the
    negative part of the covariance row Σ^(i) of pixel ``pixel`` (flat index), so cov_pos − cov_neg = Σ_i·."""

    image_shape: Shape
    z: torch.Tensor
    mean: torch.Tensor
    sample: torch.Tensor
    residual: torch.Tensor
    variance: torch.Tensor
    cov_pos: torch.Tensor
    cov_neg: torch.Tensor
    pixel: int
    rank: int

    @property
    def pixel_chw(self) -> tuple[int, int, int]:
        """(channel, row, column) of ``pixel``."""
        c, h, w = self.image_shape
        return self.pixel // (h * w), (self.pixel // w) % h, self.pixel % w

    def summary(self) -> dict[str, float]:
        """residual_corr: lag-1 spatial correlation of y − μ (≈ 0 for pixel-wise noise); residual_rms;
        mean_variance; cov_self_error: max |Σ_ii − variance_i| (consistency of the two O(D·R) paths);
        cov_offdiag_fraction: share of |Σ_i·| off the diagonal (0 for a pixel-wise independent model)."""
        row = self.cov_pos - self.cov_neg
        diag_i = row[:, self.pixel]
        off = row.abs().sum(-1) - diag_i.abs()
        return dict(
            residual_corr=float(lag1_correlation(self.residual, self.image_shape)),
            residual_rms=float(self.residual.double().pow(2).mean().sqrt()),
            mean_variance=float(self.variance.double().mean()),
            cov_self_error=float((diag_i - self.variance[:, self.pixel]).abs().max()),
            cov_offdiag_fraction=float((off / row.abs().sum(-1).clamp_min(1e-30)).mean()),
        )


@torch.no_grad()
def prior_panel(model: Any, n: int = 10, seed: int = 0, pixel: int | None = None) -> PriorPanel:
    """Decode n prior draws z ~ N(0, I) (seeded) and compute the six rows of the sample figure.

    The sample uses noise drawn with the same seed, so two models with the same latent size shown side by side
    get the same z and, where their ranks agree, the same noise. ``pixel`` None picks `object_pixel`.
    """
    z = prior_latents(model.latent_dim, n, seed).to(_model_device(model))
    dist = model.decode(z)
    eps_r, eps_d = draw_noise(dist, n, seed + 1)
    mean = dist.loc.detach()
    sample = dist.from_noise(eps_r, eps_d).detach()
    variance = torch.broadcast_to(dist.variance, mean.shape).detach()
    shape = tuple(model.image_shape)
    if pixel is None:
        pixel = object_pixel(variance, shape)
    dim = mean.shape[-1]
    if isinstance(pixel, bool) or not isinstance(pixel, int) or not 0 <= pixel < dim:
        raise ValueError(f"pixel: must be a flat index in [0, {dim}), got {pixel!r}")
    row = dist.covariance_row(pixel).detach()
    return PriorPanel(image_shape=shape, z=z.cpu(), mean=mean.cpu(), sample=sample.cpu(),
                      residual=(sample - mean).cpu(), variance=variance.cpu(), cov_pos=row.clamp_min(0).cpu(),
                      cov_neg=(-row).clamp_min(0).cpu(), pixel=pixel, rank=_rank_of(dist))


def prior_panels(models: dict[str, Any], n: int = 10, seed: int = 0, pixel: int | None = None) -> dict[str, PriorPanel]:
    """`prior_panel` for several models on the same z and noise; pixel i (None: `object_pixel` of the first
    model) is shared, so the Σ^(i) rows of the models are comparable."""
    panels: dict[str, PriorPanel] = {}
    for name, model in models.items():
        panels[name] = prior_panel(model, n=n, seed=seed, pixel=pixel)
        pixel = panels[name].pixel
    return panels


# -------------------------------------------------------------------------------------------------------------
# Decoded distributions of one image and of the prior mode
# -------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def reconstruction(model: Any, x: torch.Tensor) -> Any:
    """p(x | z = m(x)): the observation distribution decoded from the posterior mean of one image x [C, H, W]
    (or [1, C, H, W]); batch shape [1]."""
    x = x.reshape((1,) + tuple(model.image_shape)).to(_model_device(model))
    return model.decode(model.encode(x).mean)


@torch.no_grad()
def prior_mode(model: Any) -> Any:
    """p(x | z = 0): the observation distribution at the mode of the prior; batch shape [1]."""
    return model.decode(torch.zeros(1, model.latent_dim, device=_model_device(model)))


# -------------------------------------------------------------------------------------------------------------
# Component sweeps
# -------------------------------------------------------------------------------------------------------------

def principal_directions(cov_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of P Pᵀ from the R×R problem (see the module docstring), in float64.

    cov_factor P [..., D, R] → (eigenvalues w [..., R] descending (≥ 0), coefficients V [..., R, R] whose column
    j gives the j-th principal direction as P v_j, directions U [..., D, R] orthonormal eigenvectors u_j of P Pᵀ;
    columns with w_j = 0 are 0). Cost O(D·R²)."""
    p = cov_factor.double()
    gram = p.transpose(-1, -2) @ p
    w, v = torch.linalg.eigh(gram)  # ascending
    w, v = w.flip(-1).clamp_min(0.0), v.flip(-1)
    scale = torch.where(w > 0, w.rsqrt(), torch.zeros_like(w))
    return w, v, (p @ v) * scale.unsqueeze(-2)


@dataclass
class Sweeps:
    """Images along each column of P and each principal direction of P Pᵀ, at t ∈ ``ts`` standard deviations:
    ``columns`` [K, T, D] = μ + t·P e_j; ``principal`` [K, T, D] = μ + t·√w_j u_j; ``eigenvalues`` w [R]
    (descending); ``column_norms`` ‖P e_j‖ [R]; ``mean`` μ [D]."""

    image_shape: Shape
    ts: torch.Tensor
    mean: torch.Tensor
    columns: torch.Tensor
    principal: torch.Tensor
    eigenvalues: torch.Tensor
    column_norms: torch.Tensor
    orthonormality_error: float = 0.0
    column_order: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """rank; eigenvalues; top_fraction: w_1 / Σ w (share of P Pᵀ's trace in the first direction);
        trace_error: |Σ w − ‖P‖²_F| / ‖P‖²_F (the R×R and D×R paths agree); orthonormality_error:
        max |Uᵀ U − I| over the directions with w > 0; sweep_range: max |image − μ| at the largest |t|."""
        total = float(self.eigenvalues.sum())
        frob = float(self.column_norms.double().pow(2).sum())
        return dict(rank=int(self.eigenvalues.numel()), eigenvalues=[float(v) for v in self.eigenvalues],
                    top_fraction=float(self.eigenvalues[0] / total) if total > 0 else 0.0,
                    trace_error=abs(total - frob) / frob if frob > 0 else 0.0,
                    orthonormality_error=self.orthonormality_error,
                    sweep_range=float((self.principal[:, -1] - self.mean).abs().max()) if self.principal.numel() else 0.0)


@torch.no_grad()
def component_sweeps(dist: Any, image_shape: Shape, ts: Sequence[float] | torch.Tensor | None = None,
                     max_components: int | None = None) -> Sweeps:
    """Sweep each column of P and each principal direction of P Pᵀ of ``dist`` (batch [] or [1]) from −3 to +3
    standard deviations (``ts``, default 7 steps). Columns are shown in order of decreasing norm; the first
    ``max_components`` of each kind are kept (None: all R)."""
    ts = torch.linspace(-3, 3, 7) if ts is None else torch.as_tensor(ts, dtype=torch.float32)
    factor = dist.cov_factor.detach().reshape(dist.cov_factor.shape[-2:])  # [D, R]
    rank = factor.shape[-1]
    if rank == 0:
        raise ValueError("dist: has no covariance factor (rank 0, e.g. the diagonal model): nothing to sweep")
    k = rank if max_components is None else min(check_int("max_components", max_components, 1), rank)
    w, v, u = principal_directions(factor)
    norms = factor.double().norm(dim=0)
    order = torch.argsort(norms, descending=True)[:k]
    eye = torch.eye(rank, dtype=factor.dtype, device=factor.device)

    def sweep(directions: torch.Tensor) -> torch.Tensor:  # directions [K, R] in noise space → images [K, T, D]
        noise = ts.to(factor)[None, :, None] * directions[:, None, :]  # [K, T, R]
        out = dist.from_noise(noise, torch.zeros(noise.shape[:2] + factor.shape[:1], dtype=factor.dtype,
                                                 device=factor.device))
        return out.reshape(noise.shape[0], noise.shape[1], -1).detach().cpu()

    live = w > w[0] * 1e-10 if w[0] > 0 else torch.zeros_like(w, dtype=torch.bool)
    gram = u[:, live].T @ u[:, live]
    ortho = (float((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max())
             if live.any() else 0.0)
    return Sweeps(image_shape=tuple(image_shape), ts=ts.cpu(), mean=dist.loc.detach().reshape(-1).cpu(),
                  columns=sweep(eye[order]), principal=sweep(v[:, :k].T.to(factor)),
                  eigenvalues=w.cpu(), column_norms=norms.cpu(), orthonormality_error=ortho,
                  column_order=[int(i) for i in order])


# -------------------------------------------------------------------------------------------------------------
# Latent interpolation with fixed observation noise
# -------------------------------------------------------------------------------------------------------------

def lerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation (1 − t) z0 + t z1: z0, z1 [L], t [T] → [T, L]."""
    t = torch.as_tensor(t, dtype=z0.dtype, device=z0.device).reshape(-1, 1)
    return (1 - t) * z0 + t * z1


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation along the great circle between z0 and z1 (Shoemake, 1985):
    sin((1 − t)Ω)/sin Ω · z0 + sin(tΩ)/sin Ω · z1 with cos Ω = z0·z1 / (‖z0‖‖z1‖); falls back to lerp when
    Ω ≈ 0. Unlike lerp it keeps ‖z‖ near the typical norm √L of prior draws. z0, z1 [L], t [T] → [T, L]."""
    t = torch.as_tensor(t, dtype=z0.dtype, device=z0.device).reshape(-1, 1)
    cos = (z0 @ z1) / (z0.norm() * z1.norm()).clamp_min(1e-30)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(omega.sin()) < 1e-6:
        return lerp(z0, z1, t.reshape(-1))
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


@dataclass
class Interpolation:
    """Decoded interpolations between two latent codes: ``ts`` [T]; for each mode in ("lerp", "slerp"):
    ``z[mode]`` [T, L], ``means[mode]`` μ(z_t) [T, D] and ``samples[mode]`` [T, D] drawn with one fixed noise
    (the same ε_R and ε_D at every step, so the change along a row comes from z alone)."""

    image_shape: Shape
    ts: torch.Tensor
    z: dict[str, torch.Tensor]
    means: dict[str, torch.Tensor]
    samples: dict[str, torch.Tensor]

    def summary(self) -> dict[str, float]:
        """endpoint_error: max |z_t − endpoint| at t = 0 and 1 over both modes (≈ 0); slerp_norm_ratio /
        lerp_norm_ratio: min over t of ‖z_t‖ divided by the mean endpoint norm (slerp stays near 1, lerp dips);
        step_rms: RMS difference between consecutive sample images (the path is smooth when it is small)."""
        out: dict[str, float] = {}
        err = 0.0
        for mode, z in self.z.items():
            err = max(err, float((z[0] - self.z["lerp"][0]).abs().max()), float((z[-1] - self.z["lerp"][-1]).abs().max()))
            ends = 0.5 * (z[0].norm() + z[-1].norm())
            out[f"{mode}_norm_ratio"] = float(z.norm(dim=-1).min() / ends)
            out[f"{mode}_step_rms"] = float((self.samples[mode][1:] - self.samples[mode][:-1]).double().pow(2)
                                            .mean().sqrt())
        out["endpoint_error"] = err
        return out


@torch.no_grad()
def interpolate(model: Any, steps: int = 8, seed: int = 0, z0: torch.Tensor | None = None,
                z1: torch.Tensor | None = None) -> Interpolation:
    """Decode lerp and slerp paths between two latent codes (two seeded prior draws unless given) in ``steps``
    steps, with fixed observation noise (seeded) for the samples."""
    check_int("steps", steps, 2)
    device = _model_device(model)
    zz = prior_latents(model.latent_dim, 2, seed)
    z0 = zz[0] if z0 is None else z0.reshape(-1).cpu().float()
    z1 = zz[1] if z1 is None else z1.reshape(-1).cpu().float()
    ts = torch.linspace(0, 1, steps)
    paths = {"lerp": lerp(z0, z1, ts), "slerp": slerp(z0, z1, ts)}
    means, samples = {}, {}
    noise = None
    for mode, z in paths.items():
        dist = model.decode(z.to(device))
        if noise is None:
            noise = draw_noise(dist, None, seed + 1)
        eps_r, eps_d = noise
        means[mode] = dist.loc.detach().cpu()
        samples[mode] = dist.from_noise(eps_r.expand(steps, -1), eps_d.expand(steps, -1)).detach().cpu()
    return Interpolation(image_shape=tuple(model.image_shape), ts=ts, z=paths, means=means, samples=samples)

