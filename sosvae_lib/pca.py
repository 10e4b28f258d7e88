"""Global PCA / probabilistic PCA baseline of the same rank as SOS-VAE's covariance factor (Langley et al.,
"Structured Uncertainty in the Observation Space of Variational Autoencoders", TMLR 2022; the authors' code
compares against a global PCA).

Probabilistic PCA (Tipping & Bishop, 1999): x ~ N(m, W Wᵀ + σ² I) with m the training mean, the columns of
U the top-R eigenvectors of the sample covariance S with eigenvalues λ_1 ≥ … ≥ λ_R, and the maximum-likelihood
solution σ² = (tr S − Σ_{j≤R} λ_j) / (D − R), W = U diag(λ_j − σ²)^{1/2}. The fit never forms S: it uses the
SVD of the centred data (exact when min(N, D) is small, randomised otherwise), and tr S = ‖X − m‖²_F / N.
Unlike the VAE, the baseline is one global Gaussian: the same μ and P for every image.

The fit runs in float64 on the training images' device (a GPU's float64 is fast enough at these sizes: the
largest product is N×D by D×N), so `sosvae_lib.evaluate` fits and scores the baseline where the model runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .distributions import LowRankNormal

_EXACT_LIMIT = 2048  # min(N, D) up to which the SVD is exact


@dataclass(frozen=True)
class PCAModel:
    """A fitted PCA / PPCA: mean [D], components U [D, R] (orthonormal columns), eigenvalues λ [R] (descending),
    noise_var σ², explained_variance_ratio (Σ_{j≤R} λ_j / tr S). Tensors are float64, on the device of the
    training images (`to` moves them)."""

    mean: torch.Tensor
    components: torch.Tensor
    eigenvalues: torch.Tensor
    noise_var: float
    total_variance: float

    def to(self, device: torch.device | str) -> "PCAModel":
        """The same fit with its tensors on ``device``."""
        return replace(self, mean=self.mean.to(device), components=self.components.to(device),
                       eigenvalues=self.eigenvalues.to(device))

    @property
    def rank(self) -> int:
        return int(self.components.shape[1])

    @property
    def explained_variance_ratio(self) -> float:
        return float(self.eigenvalues.sum() / self.total_variance)

    @property
    def factor(self) -> torch.Tensor:
        """W = U diag(λ − σ²)^{1/2} [D, R], the PPCA covariance factor."""
        return self.components * (self.eigenvalues - self.noise_var).clamp_min(0).sqrt()

    def distribution(self, n: int | None = None, dtype: torch.dtype = torch.float32) -> LowRankNormal:
        """The PPCA density N(m, W Wᵀ + σ² I) as a LowRankNormal: event [D], or batch [n] (expanded) if n given."""
        dist = LowRankNormal(self.mean.to(dtype), self.factor.to(dtype),
                             torch.full_like(self.mean, self.noise_var, dtype=dtype))
        return dist if n is None else dist.expand((n,))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction m + U Uᵀ (x − m) of flattened images x [B, D] from the top-R components."""
        xc = x.double() - self.mean
        return self.mean + (xc @ self.components) @ self.components.T


def usable_rank(rank: int, train_images: torch.Tensor) -> int:
    """The largest rank ≤ ``rank`` a PPCA fit on ``train_images`` [N, ...] supports: min(rank, min(N, D) − 1), so
    that σ² keeps at least one discarded direction to average over."""
    n, d = train_images.shape[0], train_images[0].numel()
    return min(int(rank), min(n, d) - 1)


def fit_pca(train_images: torch.Tensor, rank: int, noise_var: float | None = None, min_noise_var: float = 1e-6,
            seed: int = 0) -> PCAModel:
    """Fit PCA / PPCA of rank R to train_images [N, D] (or [N, C, H, W], flattened channel-first).

    noise_var: σ² (None: the PPCA maximum-likelihood value, floored at min_noise_var so the density stays
    proper). The SVD is exact when min(N, D) ≤ 2048, else randomised (`_randomized_right_vectors`, R + 20
    columns, 6 power iterations, seeded by ``seed``: the same on every device, the global generators untouched).
    Computed on the device of ``train_images``.
    """
    x = train_images.reshape(train_images.shape[0], -1).double()
    n, d = x.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < min(n, d):
        raise ValueError(f"rank: must be an integer with 1 <= rank < min(N, D) = {min(n, d)}, got {rank!r}")
    if noise_var is not None and not noise_var > 0:
        raise ValueError(f"noise_var: must be a number > 0 or None, got {noise_var!r}")
    mean = x.mean(0)
    xc = x - mean
    total = float((xc * xc).sum() / n)
    if min(n, d) <= _EXACT_LIMIT:
        if n <= d:  # eigenvectors of the N×N Gram matrix give those of S
            w, v = torch.linalg.eigh(xc @ xc.T)
            w, v = w.flip(0)[:rank].clamp_min(0), v.flip(1)[:, :rank]
            s = w.sqrt()
            u = (xc.T @ v) / s.clamp_min(1e-300)
        else:
            w, u = torch.linalg.eigh(xc.T @ xc)
            w, u = w.flip(0)[:rank].clamp_min(0), u.flip(1)[:, :rank]
            s = w.sqrt()
    else:
        s, u = _randomized_right_vectors(xc, q=min(rank + 20, min(n, d)), niter=6, seed=seed)
        u, s = u[:, :rank], s[:rank]
    eig = s ** 2 / n
    if noise_var is None:
        noise_var = max((total - float(eig.sum())) / (d - rank), min_noise_var)
    return PCAModel(mean=mean, components=u, eigenvalues=eig, noise_var=float(noise_var), total_variance=total)


def _randomized_right_vectors(x: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q singular values [q] and right singular vectors [D, q] of x [N, D] by randomised subspace iteration
    (Halko, Martinsson & Tropp, 2011, algorithms 4.4 and 5.1): Q = orth(x Ω) for a Gaussian Ω [D, q], refined by
    ``niter`` power iterations Q ← orth(x orth(xᵀ Q)); then the SVD of the small B = Qᵀ x = U_B S Vᵀ gives x ≈ (Q U_B)
    S Vᵀ. Ω is drawn on the CPU from a generator seeded by ``seed`` and moved to x's device."""
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(x.shape[1], q, generator=gen, dtype=x.dtype).to(x.device)
    basis = torch.linalg.qr(x @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(x @ torch.linalg.qr(x.mT @ basis).Q).Q
    _, s, vh = torch.linalg.svd(basis.mT @ x, full_matrices=False)
    return s, vh.mT
