"""Metrics that turn the claims of SOS-VAE into numbers (Langley et al., "Structured Uncertainty in the
Observation Space of Variational Autoencoders", TMLR 2022).

Every function works on tensors or on any observation distribution of `sosvae_lib.distributions`
(`LowRankNormal`, or `DiagonalNormal` whose factor has rank 0): only ``.loc``, ``.cov_factor``,
``.cov_diag``, ``.variance``, ``.log_prob``, ``.sample`` and ``.condition`` are used. Images are flattened
channel-first, ``x.reshape(B, C*H*W)``; functions that need the image grid take ``image_shape = (C, H, W)``.

Conventions (stated once, here):

- **Bits per dimension.** Pixel values x ∈ [0, 1] are 8-bit levels x = k/255 as `sosvae_lib.data` returns them.
  Dequantisation (the training convention of ``TrainConfig.dequantize``) maps level k to a uniform point of
  its bin, x̃ = (k + u)/256 = (255·x + u)/256 with u ~ U[0, 1)^D, so x̃ ∈ [0, 1)^D. The bins
  [k/256, (k+1)/256)^D are disjoint, so P(k) = ∫_bin p(x̃) dx̃ ≥ 256^{-D} exp E_u log p(x̃) (Jensen), and
  ``bpd = (NLL + D·ln 256) / (D·ln 2)``, NLL = −log p(x̃) in nats of the continuous density on the [0, 1]
  scale, is (in expectation over u) an upper bound on the code length in bits per sub-pixel of the 8-bit
  image. Each pixel of each channel is one dimension (D = C·H·W). The same formula is
  used for every data set (continuous data such as ``synthetic`` are then scored on the same 0…256 scale
  without dequantisation noise).
- **Importance-sampled likelihood (IWAE).** log p(x) ≥ log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x);
  K = 1 gives the ELBO in expectation, and the bound tightens as K grows (Burda et al., 2016).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch
from torch.distributions import Normal, kl_divergence
from torch.nn import functional as F

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------
# Bits per dimension and the importance-sampled likelihood
# ----------------------------------------------------------------------------------------------------------

def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (made on the CPU) on ``device``: to a GPU through pinned memory and a non-blocking copy, so the host
    does not wait for the GPU's queue (the copy is ordered on the stream before the kernels that read it)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _noise_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where random noise for tensors on ``device`` is drawn: on the generator's device (a CPU generator gives the
    same draws on every device, so the CPU and the GPU evaluate the same numbers; `host_to` moves them), or on
    ``device`` itself when there is no generator (its global generator)."""
    return device if generator is None else torch.device(generator.device)


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None, bits: int = 8) -> torch.Tensor:
    """x = k/(2^bits − 1) → x̃ = (k + u)/2^bits, u ~ U[0, 1) elementwise: uniform noise over k's bin. Any shape.
    u is drawn on ``generator``'s device (see `_noise_device`)."""
    levels = 2 ** bits
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=_noise_device(generator, x.device))
    return (x * (levels - 1) + host_to(u, x.device)) / levels


def bits_per_dim(nll_nats: torch.Tensor | float, num_dims: int | torch.Tensor, bits: int = 8):
    """bpd = (NLL + D·ln 2^bits) / (D·ln 2): nats of a density on [0, 1] → bits per sub-pixel on the 8-bit scale.

    ``nll_nats`` and ``num_dims`` broadcast (tensors or floats); the result has their shape.
    """
    return (nll_nats + num_dims * bits * LOG2) / (num_dims * LOG2)


def gaussian_bpd(dist: Any, x: torch.Tensor) -> torch.Tensor:
    """Exact bits per dimension of flattened x [B, D] under a distribution over D pixels (no latent): [B]."""
    return bits_per_dim(-dist.log_prob(x).double(), x.shape[-1])


class LatentModel(Protocol):
    """What the likelihood estimators need of a VAE (`sosvae_lib.model.VAE` satisfies it)."""

    def encode(self, x: torch.Tensor) -> Normal: ...

    def decode(self, z: torch.Tensor) -> Any: ...


def standard_normal_kl(posterior: Normal) -> torch.Tensor:
    """KL(q(z|x) ‖ N(0, I)) in nats, summed over latents: posterior with batch shape [B, L] → [B]."""
    prior = Normal(torch.zeros_like(posterior.loc), torch.ones_like(posterior.scale), validate_args=False)
    return kl_divergence(posterior, prior).sum(-1)


@torch.no_grad()
def iwae_log_likelihood(model: LatentModel, x: torch.Tensor, k: int = 8,
                        generator: torch.Generator | None = None,
                        variants: Mapping[str, Callable[[Any], Any]] | None = None) -> dict[str, torch.Tensor]:
    """Importance-sampled log-likelihood and ELBO of images x [B, C, H, W] (already dequantised), in nats.

    Returns dict(log_likelihood [B] = log (1/K) Σ_k w_k, the IWAE bound with log w_k = log p(x|z_k) +
    log p(z_k) − log q(z_k|x); elbo [B] = mean_k log p(x|z_k) − KL(q‖p) with the KL in closed form;
    kl [B]; recon_nll [B] = −mean_k log p(x|z_k)). One decoder call of batch B per importance sample.
    ``variants`` {name: f}: also the bound ``log_likelihood_<name>`` [B] of the observation model f(p(x|z)) (e.g.
    `sosvae_lib.calibration.rescale_diagonal` at a calibrated scale), from the same z_k and the same decoder calls.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: must be an integer >= 1 (importance samples), got {k!r}")
    variants = dict(variants or {})
    posterior = model.encode(x)
    flat = x.reshape(x.shape[0], -1)
    loc, scale = posterior.loc, posterior.scale
    q = Normal(loc, scale, validate_args=False)  # validation would read back from the device at every call
    p = Normal(torch.zeros_like(loc), torch.ones_like(loc), validate_args=False)
    log_w, log_px = [], []
    log_w_var: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    for _ in range(k):
        eps = torch.randn(loc.shape, generator=generator, dtype=loc.dtype,
                          device=_noise_device(generator, loc.device))
        z = loc + scale * host_to(eps, loc.device)
        obs = model.decode(z)
        lp = obs.log_prob(flat).double()
        log_q = q.log_prob(z).sum(-1).double()
        log_p = p.log_prob(z).sum(-1).double()
        log_px.append(lp)
        log_w.append(lp + log_p - log_q)
        for name, f in variants.items():
            log_w_var[name].append(f(obs).log_prob(flat).double() + log_p - log_q)
    log_w_t = torch.stack(log_w)  # [K, B]
    log_px_t = torch.stack(log_px)
    kl = standard_normal_kl(posterior).double()
    out = dict(log_likelihood=torch.logsumexp(log_w_t, 0) - math.log(k),
               elbo=log_px_t.mean(0) - kl, kl=kl, recon_nll=-log_px_t.mean(0))
    for name, ws in log_w_var.items():
        out[f"log_likelihood_{name}"] = torch.logsumexp(torch.stack(ws), 0) - math.log(k)
    return out


# ----------------------------------------------------------------------------------------------------------
# Spatial structure of residuals: lag-1 correlation
# ----------------------------------------------------------------------------------------------------------

def _as_images(x: torch.Tensor, image_shape: tuple[int, int, int] | None) -> torch.Tensor:
    """[N, D] (with image_shape) or [N, C, H, W] → [N, C, H, W]."""
    if x.dim() == 4:
        return x
    if image_shape is None:
        raise ValueError(f"image_shape: needed (C, H, W) for flattened input of shape {tuple(x.shape)}")
    c, h, w = image_shape
    if x.dim() != 2 or x.shape[1] != c * h * w:
        raise ValueError(f"image_shape: {tuple(image_shape)} does not match input of shape {tuple(x.shape)}; "
                         f"expected [N, {c * h * w}] or [N, C, H, W]")
    return x.reshape(x.shape[0], c, h, w)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pooled Pearson correlation of the paired entries of a and b (same shape)."""
    a = a.double().flatten()
    b = b.double().flatten()
    a = a - a.mean()
    b = b - b.mean()
    denom = torch.sqrt((a * a).sum() * (b * b).sum())
    if denom <= 0:
        return float("nan")
    return float((a * b).sum() / denom)


def lag1_correlation(residuals: torch.Tensor, image_shape: tuple[int, int, int] | None = None,
                     return_parts: bool = False) -> float | dict[str, float]:
    """Lag-1 spatial correlation of residual images, [N, C, H, W] or [N, D] with image_shape.

    ρ_h is the Pearson correlation of all horizontally adjacent pairs (r[..., i, j], r[..., i, j+1]) pooled over
    images, channels and positions; ρ_v the same for vertical pairs; the result is (ρ_h + ρ_v) / 2 (or
    dict(h, v, mean) with ``return_parts``). White noise gives ≈ 0; a separable AR(1) field with coefficient
    φ gives φ. SOS-VAE's claim, made measurable: the value for sample residuals y − μ matches the value for
    data residuals x − μ(x), while a pixel-wise independent model gives ≈ 0 for its samples.
    """
    r = _as_images(residuals, image_shape)
    h, w = r.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"residuals: need images of at least 2×2 pixels, got {h}×{w}")
    rho_h = _pearson(r[..., :, :-1], r[..., :, 1:])
    rho_v = _pearson(r[..., :-1, :], r[..., 1:, :])
    mean = 0.5 * (rho_h + rho_v)
    return dict(h=rho_h, v=rho_v, mean=mean) if return_parts else mean


# ----------------------------------------------------------------------------------------------------------
# Span of the covariance factor: captured residual energy, principal angles
# ----------------------------------------------------------------------------------------------------------

def projected_energy(residual: torch.Tensor, factor: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """‖Π_P r‖², the energy of r in span(P): residual [..., D], factor [..., D, R] (broadcast) → [...].

    With G = PᵀP = V diag(w) Vᵀ (an R×R eigendecomposition in float64) and c = Vᵀ Pᵀ r,
    ‖Π_P r‖² = Σ_{w_j > rtol·max w} c_j² / w_j; directions with (numerically) zero singular value are not part
    of the span, so a rank-deficient P is handled, and R = 0 gives 0. Cost O(D·R²); no D×D matrix.
    """
    r = residual.double()
    p = factor.double()
    if p.shape[-1] == 0:
        return torch.zeros(torch.broadcast_shapes(r.shape[:-1], p.shape[:-2]), dtype=torch.float64,
                           device=r.device)
    gram = p.transpose(-1, -2) @ p  # [..., R, R]
    ptr = (p.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)  # [..., R]
    w, v = torch.linalg.eigh(gram)
    c = (v.transpose(-1, -2) @ ptr.unsqueeze(-1)).squeeze(-1)
    keep = w > rtol * w.amax(-1, keepdim=True).clamp_min(1e-300)
    return torch.where(keep, c * c / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w)).sum(-1)


def span_capture(residual: torch.Tensor, factor: torch.Tensor) -> float:
    """Fraction of the residual energy in span(P): Σ_b ‖Π_{P_b} r_b‖² / Σ_b ‖r_b‖² ∈ [0, 1].

    residual [B, D], factor [B, D, R] or [D, R]. 1 when every r_b ∈ span(P_b), 0 when orthogonal (and for the
    rank-0 diagonal model); a random R-dimensional subspace captures R/D on average. The paper's claim predicts
    that the learned P captures much more of x − μ(x) than R/D, ideally more than a global PCA of the same rank.
    """
    total = (residual.double() ** 2).sum()
    if total <= 0:
        raise ValueError("residual: all zero, the captured fraction is undefined")
    return float(projected_energy(residual, factor).sum() / total)


def orthonormal_basis(factor: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis [D, r'] of span(factor [D, R]) from its SVD, dropping singular values below
    rtol·max (r' ≤ R)."""
    if factor.dim() != 2:
        raise ValueError(f"factor: expected a [D, R] matrix, got shape {tuple(factor.shape)}")
    u, s, _ = torch.linalg.svd(factor.double(), full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return u[:, :0]
    return u[:, s > rtol * s[0]]


def principal_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between span(a [D, R1]) and span(b [D, R2]): min(r1', r2') values.

    cos θ_i are the singular values of Q_aᵀ Q_b for orthonormal bases Q (Björck & Golub, 1973).
    """
    qa, qb = orthonormal_basis(a), orthonormal_basis(b)
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        raise ValueError("a, b: both factors need a non-zero span to define principal angles")
    cos = torch.linalg.svdvals(qa.transpose(0, 1) @ qb).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))  # svdvals descend, so the angles ascend


def span_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (degrees) between span(a [D, R1]) and span(b [D, R2]): 0 when one span contains
    the other, 90 when some direction of the smaller span is orthogonal to the larger."""
    return float(principal_angles_deg(a, b)[-1])


# ----------------------------------------------------------------------------------------------------------
# Inpainting by Gaussian conditioning
# ----------------------------------------------------------------------------------------------------------

def patch_masks(image_shape: tuple[int, int, int], tops: torch.Tensor, lefts: torch.Tensor,
                size: int = 10) -> torch.Tensor:
    """Boolean masks [B, D] that are True on a size×size patch (all channels) with corner (tops[b], lefts[b]);
    made on the corners' device."""
    c, h, w = image_shape
    if size > h or size > w:
        raise ValueError(f"size: patch of {size}×{size} does not fit images of {h}×{w}")
    tops, lefts = torch.as_tensor(tops).long(), torch.as_tensor(lefts).long()
    rows = torch.arange(h, device=tops.device)
    cols = torch.arange(w, device=lefts.device)
    in_rows = (rows[None, :] >= tops[:, None]) & (rows[None, :] < tops[:, None] + size)  # [B, H]
    in_cols = (cols[None, :] >= lefts[:, None]) & (cols[None, :] < lefts[:, None] + size)  # [B, W]
    grid = in_rows[:, :, None] & in_cols[:, None, :]  # [B, H, W]
    return grid[:, None].expand(-1, c, -1, -1).reshape(tops.shape[0], c * h * w)


def random_patch_corners(n: int, image_shape: tuple[int, int, int], size: int = 10,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n uniformly random top-left corners (tops [n], lefts [n]) of size×size patches inside the image, on the
    generator's device (the CPU without one)."""
    _, h, w = image_shape
    if not 1 <= size <= min(h, w):
        raise ValueError(f"size: patch of {size}×{size} does not fit images of {h}×{w}")
    device = None if generator is None else generator.device
    tops = torch.randint(0, h - size + 1, (n,), generator=generator, device=device)
    lefts = torch.randint(0, w - size + 1, (n,), generator=generator, device=device)
    return tops, lefts


def most_uncertain_patch(variance: torch.Tensor, image_shape: tuple[int, int, int],
                         size: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Corner (tops [B], lefts [B]) of the size×size patch with the largest total marginal variance
    Σ_{i ∈ patch, all channels} Σ_ii; variance [B, D] (e.g. ``dist.variance``). On the variance's device."""
    c, h, w = image_shape
    v = variance.detach().double().reshape(-1, c, h, w).sum(1, keepdim=True)
    pooled = F.avg_pool2d(v, size, stride=1)[:, 0]  # [B, H-size+1, W-size+1]
    idx = pooled.flatten(1).argmax(1)
    return idx // pooled.shape[-1], idx % pooled.shape[-1]


INPAINT_FAMILIES = ("random50", "patch10", "patch10_maxvar", "top_half", "left_half")
"""The mask families of the inpainting metrics. In each the named region is *observed* (revealed) and every other
pixel is hidden and scored; a pixel position is observed or hidden in all channels together.
``random50``: ⌊H·W/2⌋ pixel positions drawn uniformly without replacement, independently per image
(`random_pixel_masks`); ``patch10``: a square of side ``patch`` (10 by default) at a uniformly random position
(`random_patch_corners`, `patch_masks`); ``patch10_maxvar``: the square of largest total marginal variance
(`most_uncertain_patch`); ``top_half``: rows 0 … ⌊H/2⌋ − 1; ``left_half``: columns 0 … ⌊W/2⌋ − 1
(`half_masks`)."""


def random_pixel_masks(n: int, image_shape: tuple[int, int, int], fraction: float = 0.5,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean masks [n, D], True on exactly ⌊fraction·H·W⌋ pixel positions (all channels of each), drawn uniformly
    without replacement and independently for each of the n images; on the generator's device (the CPU without
    one)."""
    c, h, w = image_shape
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: must be in [0, 1], got {fraction!r}")
    keep = int(math.floor(fraction * h * w))
    order = torch.rand(n, h * w, generator=generator, device=None if generator is None else generator.device)
    order = order.argsort(-1)
    grid = torch.zeros(n, h * w, dtype=torch.bool, device=order.device).scatter_(1, order[:, :keep], True)
    return grid[:, None].expand(n, c, h * w).reshape(n, c * h * w)


def half_masks(n: int, image_shape: tuple[int, int, int], side: str,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean masks [n, D] (all channels), True on the top half (``side="top"``: rows i < ⌊H/2⌋) or the left half
    (``side="left"``: columns j < ⌊W/2⌋) of the image; the same for all n images; made on ``device``."""
    c, h, w = image_shape
    grid = torch.zeros(h, w, dtype=torch.bool, device=device)
    if side == "top":
        grid[: h // 2] = True
    elif side == "left":
        grid[:, : w // 2] = True
    else:
        raise ValueError(f"side: must be 'top' or 'left', got {side!r}")
    return grid.reshape(1, 1, h * w).expand(n, c, h * w).reshape(n, c * h * w)


@dataclass
class Inpainting:
    """Result of `inpaint`, per image: means [B, D]; squared errors and NLL summed over hidden pixels [B]."""

    uncond_mean: torch.Tensor
    cond_mean: torch.Tensor
    sq_err_uncond: torch.Tensor
    sq_err_cond: torch.Tensor
    hidden_nll: torch.Tensor
    hidden_nll_uncond: torch.Tensor
    num_hidden: torch.Tensor


def inpaint(dist: Any, x: torch.Tensor, observed: torch.Tensor) -> Inpainting:
    """Reveal the pixels ``observed`` [B, D] (bool; counts may differ across rows) of the true images x [B, D],
    condition the observation distribution ``dist`` (batch [B]) on them, and score the hidden pixels H.

    uncond_mean = μ; cond_mean = μ_H + Σ_HO Σ_OO⁻¹ (x_O − μ_O) on H (via ``dist.condition``), x on O.
    hidden_nll = −log p(x_H | x_O) in nats (the conditional's ``log_prob`` scores only unobserved pixels);
    hidden_nll_uncond = −log p(x_H) = −log p(x) + log p(x_O | x_H), the chain rule, for comparison.
    For a pixel-wise independent model cond_mean = uncond_mean on H and the two NLLs agree.
    """
    observed = observed.to(torch.bool).expand_as(x)
    hidden = ~observed
    cond = dist.condition(observed, x)
    mu = dist.loc.detach()
    cmean = torch.where(observed, x, cond.loc.detach())
    nll = -cond.log_prob(x).double()
    nll_uncond = -(dist.log_prob(x).double() - dist.condition(hidden, x).log_prob(x).double())
    hf = hidden.double()
    return Inpainting(uncond_mean=mu, cond_mean=cmean,
                      sq_err_uncond=(((x - mu).double() ** 2) * hf).sum(-1),
                      sq_err_cond=(((x - cmean).double() ** 2) * hf).sum(-1),
                      hidden_nll=nll, hidden_nll_uncond=nll_uncond, num_hidden=hidden.sum(-1))


# ----------------------------------------------------------------------------------------------------------
# Radially averaged power spectrum
# ----------------------------------------------------------------------------------------------------------

def radial_log_power_spectrum(images: torch.Tensor, image_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """log10 of the radially averaged power spectrum of a set of images ([N, C, H, W] or [N, D] + image_shape).

    Power |F_{ky,kx}|² / (H·W) of each image and channel (so white noise of variance σ² has a flat spectrum
    σ²), averaged over images, channels and the frequencies whose radius
    ρ = round(min(H, W) · sqrt((ky/H)² + (kx/W)²)) falls in each bin ρ = 0 … ⌊min(H, W)/2⌋ → [⌊min(H,W)/2⌋ + 1].
    """
    x = _as_images(images, image_shape).double()
    n, c, h, w = x.shape
    power = torch.fft.fft2(x).abs().pow(2).mean((0, 1)) / (h * w)  # [H, W]
    ky = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    kx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    radius = torch.round(min(h, w) * torch.sqrt(ky ** 2 + kx ** 2)).long().flatten()
    nbins = min(h, w) // 2 + 1
    keep = radius < nbins
    total = torch.zeros(nbins, dtype=torch.float64).index_add_(0, radius[keep], power.flatten().cpu()[keep])
    count = torch.bincount(radius[keep], minlength=nbins).double()
    return torch.log10(total / count)


def spectrum_distance(a: torch.Tensor, b: torch.Tensor, image_shape: tuple[int, int, int] | None = None) -> float:
    """RMS difference (in decades of power) of the radially averaged log10 power spectra of two image sets,
    over the non-constant radii 1 … ⌊min(H, W)/2⌋. White noise of variance 1 vs 4 gives log10 4 ≈ 0.602."""
    sa = radial_log_power_spectrum(a, image_shape)
    sb = radial_log_power_spectrum(b, image_shape)
    if sa.shape != sb.shape:
        raise ValueError(f"a, b: image sizes differ ({sa.shape[0]} vs {sb.shape[0]} radial bins)")
    return float(torch.sqrt(((sa[1:] - sb[1:]) ** 2).mean()))


# ----------------------------------------------------------------------------------------------------------
# Fréchet distance between feature distributions
# ----------------------------------------------------------------------------------------------------------

def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh; negative round-off clamped)."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.mT


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein) distance, squared, between Gaussians fitted to two feature sets a [N, F], b [M, F]:

        d² = ‖m_a − m_b‖² + tr S_a + tr S_b − 2 tr (S_a^{1/2} S_b S_a^{1/2})^{1/2},

    m the means and S the unbiased covariances (Dowson & Landau, 1982), in float64. The squared form is the FID
    convention, but FID is this formula on Inception-v3 pool features only; on other features it is not FID.
    With N ≤ F the covariances are rank-deficient and d² is biased upwards: compare values at equal N, M.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: need feature matrices [N, F] and [M, F] of one width F, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"a, b: need at least 2 rows each for a covariance, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double(), b.double()
    ma, mb = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    ra = _psd_sqrt(sa)
    cross = torch.linalg.eigvalsh(ra @ sb @ ra).clamp_min(0).sqrt().sum()
    return float(((ma - mb) ** 2).sum() + torch.trace(sa) + torch.trace(sb) - 2 * cross)
