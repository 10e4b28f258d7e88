"""Known-answer tests of sosvae_lib.metrics and sosvae_lib.pca (issue 5)."""

from __future__ import annotations

import math

import pytest
import torch

from sosvae_lib import metrics as M
from sosvae_lib import pca as P
from sosvae_lib.distributions import DiagonalNormal, LowRankNormal

torch.set_num_threads(1)


def _ar1_field(n: int, h: int, w: int, phi_h: float, phi_v: float, gen: torch.Generator) -> torch.Tensor:
    """Separable stationary AR(1) field, unit variance: corr(x[i, j], x[i+a, j+b]) = phi_v^|a| phi_h^|b|."""
    x = torch.randn(n, 1, h, w, generator=gen, dtype=torch.float64)
    for j in range(1, w):
        x[..., j] = phi_h * x[..., j - 1] + math.sqrt(1 - phi_h ** 2) * x[..., j]
    for i in range(1, h):
        x[..., i, :] = phi_v * x[..., i - 1, :] + math.sqrt(1 - phi_v ** 2) * x[..., i, :]
    return x


# ------------------------------------------------------------------------------------------------- lag-1 correlation

def test_lag1_white_noise_is_zero():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(100, 3, 32, 32, generator=gen)
    parts = M.lag1_correlation(noise, return_parts=True)
    assert abs(parts["h"]) < 0.01 and abs(parts["v"]) < 0.01 and abs(parts["mean"]) < 0.01


@pytest.mark.parametrize("phi", [0.3, 0.8])
def test_lag1_ar1_field_gives_its_coefficient(phi):
    gen = torch.Generator().manual_seed(1)
    field = _ar1_field(100, 32, 32, phi, phi, gen)
    assert M.lag1_correlation(field) == pytest.approx(phi, abs=0.02)
    flat = field.reshape(100, -1)  # flattened input with the image shape gives the same number
    assert M.lag1_correlation(flat, (1, 32, 32)) == pytest.approx(M.lag1_correlation(field), abs=1e-12)


def test_lag1_anisotropic_parts():
    gen = torch.Generator().manual_seed(2)
    parts = M.lag1_correlation(_ar1_field(100, 32, 32, 0.5, 0.0, gen), return_parts=True)
    assert parts["h"] == pytest.approx(0.5, abs=0.02)
    assert parts["v"] == pytest.approx(0.0, abs=0.02)
    assert parts["mean"] == pytest.approx(0.25, abs=0.02)


def test_lag1_rejects_bad_shape():
    with pytest.raises(ValueError, match="image_shape"):
        M.lag1_correlation(torch.zeros(3, 10), (1, 3, 4))


# ------------------------------------------------------------------------------------------------- span capture

def test_span_capture_in_span_and_orthogonal():
    gen = torch.Generator().manual_seed(3)
    b, d, r = 4, 50, 5
    factor = torch.randn(b, d, r, generator=gen, dtype=torch.float64)
    inside = (factor @ torch.randn(b, r, 1, generator=gen, dtype=torch.float64)).squeeze(-1)
    assert M.span_capture(inside, factor) == pytest.approx(1.0, abs=1e-10)
    noise = torch.randn(b, d, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(factor)
    orth = noise - (q @ (q.transpose(1, 2) @ noise.unsqueeze(-1))).squeeze(-1)
    assert M.span_capture(orth, factor) == pytest.approx(0.0, abs=1e-10)
    # Half the energy in the span, half outside → 0.5.
    mixed = inside / inside.norm(dim=-1, keepdim=True) + orth / orth.norm(dim=-1, keepdim=True)
    assert M.span_capture(mixed, factor) == pytest.approx(0.5, abs=1e-10)
    # A shared [D, R] factor broadcasts over the batch.
    assert M.span_capture(inside[:1], factor[0]) == pytest.approx(1.0, abs=1e-10)


def test_span_capture_rank_deficient_and_rank_zero():
    gen = torch.Generator().manual_seed(4)
    d = 30
    factor = torch.randn(d, 3, generator=gen, dtype=torch.float64)
    factor[:, 2] = 0.0  # a zero column does not add a direction to the span
    noise = torch.randn(1, d, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(factor[:, :2])
    orth = noise - (noise @ q) @ q.T
    assert M.span_capture(orth, factor) == pytest.approx(0.0, abs=1e-10)
    assert M.span_capture(noise, torch.zeros(d, 0, dtype=torch.float64)) == 0.0
    # Random R-dimensional span of a random residual: R / D on average.
    many = torch.randn(2000, d, generator=gen, dtype=torch.float64)
    assert M.span_capture(many, factor[:, :2]) == pytest.approx(2 / d, rel=0.1)


# ------------------------------------------------------------------------------------------------- principal angles

def test_principal_angles():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    mix = torch.randn(3, 3, generator=gen, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    assert M.span_angle_deg(a, a @ mix) == pytest.approx(0.0, abs=1e-5)
    e = torch.eye(20, dtype=torch.float64)
    theta = 30.0
    b = torch.stack([e[0], math.cos(math.radians(theta)) * e[1] + math.sin(math.radians(theta)) * e[5]], 1)
    ang = M.principal_angles_deg(e[:, :2], b)
    assert ang.tolist() == pytest.approx([0.0, theta], abs=1e-5)
    assert M.span_angle_deg(e[:, :2], e[:, 2:4]) == pytest.approx(90.0, abs=1e-6)
    # A smaller span contained in a larger one: largest angle 0.
    assert M.span_angle_deg(e[:, :1], e[:, :3]) == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------- bits per dim

def test_bits_per_dim_of_known_gaussian():
    assert M.bits_per_dim(0.0, 10) == pytest.approx(8.0)
    d, sigma = 16, 0.05
    loc = torch.rand(2, d, dtype=torch.float64)
    dist = DiagonalNormal(loc, torch.full_like(loc, sigma ** 2))
    expected = (0.5 * math.log(2 * math.pi * sigma ** 2) + math.log(256)) / math.log(2)
    assert M.gaussian_bpd(dist, loc).tolist() == pytest.approx([expected] * 2, abs=1e-9)
    # Low-rank covariance: matches the dense float64 log-density.
    factor = 0.1 * torch.randn(d, 3, dtype=torch.float64)
    lr = LowRankNormal(loc[0], factor, torch.full((d,), sigma ** 2, dtype=torch.float64))
    x = torch.rand(d, dtype=torch.float64)
    cov = factor @ factor.T + sigma ** 2 * torch.eye(d, dtype=torch.float64)
    dense = torch.distributions.MultivariateNormal(loc[0], cov).log_prob(x)
    assert float(M.gaussian_bpd(lr, x[None])) == pytest.approx(float((-dense + d * math.log(256)) / (d * math.log(2))),
                                                                abs=1e-8)


def test_dequantize_stays_in_one_bin():
    x = torch.randint(0, 256, (1000,)).double() / 255
    y = M.dequantize(x, torch.Generator().manual_seed(0))
    k = torch.round(x * 255)
    assert (y >= k / 256).all() and (y < (k + 1) / 256).all()  # inside level k's bin of [0, 1)
    assert float((y * 256 - k).mean()) == pytest.approx(0.5, abs=0.05)


class _LinearGaussian:
    """z ~ N(0, I_L), x | z ~ N(W z + b, σ² I) with orthogonal columns of W, so that the exact posterior is a
    diagonal Normal; ``posterior_scale`` multiplies its standard deviation (1 = exact)."""

    def __init__(self, d: int = 12, latent: int = 3, sigma: float = 0.3, posterior_scale: float = 1.0):
        gen = torch.Generator().manual_seed(6)
        q, _ = torch.linalg.qr(torch.randn(d, latent, generator=gen, dtype=torch.float64))
        self.w = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
        self.b = torch.randn(d, generator=gen, dtype=torch.float64)
        self.sigma2 = sigma ** 2
        self.posterior_scale = posterior_scale

    def marginal(self) -> torch.distributions.MultivariateNormal:
        cov = self.w @ self.w.T + self.sigma2 * torch.eye(self.w.shape[0], dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov)

    def encode(self, x: torch.Tensor) -> torch.distributions.Normal:
        prec = 1 + (self.w ** 2).sum(0) / self.sigma2  # diagonal because WᵀW is diagonal
        mean = ((x.reshape(x.shape[0], -1) - self.b) @ self.w) / self.sigma2 / prec
        return torch.distributions.Normal(mean, self.posterior_scale * prec.rsqrt().expand_as(mean))

    def decode(self, z: torch.Tensor) -> DiagonalNormal:
        loc = z @ self.w.T + self.b
        return DiagonalNormal(loc, torch.full_like(loc, self.sigma2))


def test_iwae_exact_with_exact_posterior_and_tightens_with_k():
    model = _LinearGaussian()
    x = model.marginal().sample((5,))
    exact = model.marginal().log_prob(x)
    out = M.iwae_log_likelihood(model, x, k=3, generator=torch.Generator().manual_seed(0))
    # With the exact posterior every importance weight equals p(x): the bound is exact for any K.
    assert out["log_likelihood"].tolist() == pytest.approx(exact.tolist(), abs=1e-8)
    # The ELBO equals log p(x) in expectation when q is exact (KL(q ‖ p(z|x)) = 0): average of many samples.
    many = M.iwae_log_likelihood(model, x, k=400, generator=torch.Generator().manual_seed(0))
    assert float(many["elbo"].mean()) == pytest.approx(float(exact.mean()), abs=0.25)
    assert torch.allclose(many["elbo"], -many["recon_nll"] - many["kl"])
    wrong = _LinearGaussian(posterior_scale=2.5)
    lo = M.iwae_log_likelihood(wrong, x, k=1, generator=torch.Generator().manual_seed(1))["log_likelihood"]
    hi = M.iwae_log_likelihood(wrong, x, k=256, generator=torch.Generator().manual_seed(1))["log_likelihood"]
    assert float((exact - hi).mean()) < float((exact - lo).mean())
    assert float((exact - hi).mean()) < 0.1
    with pytest.raises(ValueError, match="k:"):
        M.iwae_log_likelihood(model, x, k=0)


# ------------------------------------------------------------------------------------------------- inpainting

def _dense_conditional(loc, cov, obs, x):
    o, h = obs.nonzero().squeeze(-1), (~obs).nonzero().squeeze(-1)
    s_oo, s_ho, s_hh = cov[o][:, o], cov[h][:, o], cov[h][:, h]
    mean_h = loc[h] + s_ho @ torch.linalg.solve(s_oo, x[o] - loc[o])
    cov_h = s_hh - s_ho @ torch.linalg.solve(s_oo, s_ho.T)
    return h, mean_h, torch.distributions.MultivariateNormal(mean_h, cov_h).log_prob(x[h])


def test_inpaint_lowrank_equals_closed_form():
    gen = torch.Generator().manual_seed(7)
    shape, b, r = (1, 6, 6), 3, 3
    d = 36
    loc = torch.rand(b, d, generator=gen, dtype=torch.float64)
    factor = 0.3 * torch.randn(b, d, r, generator=gen, dtype=torch.float64)
    diag = 0.01 + 0.05 * torch.rand(b, d, generator=gen, dtype=torch.float64)
    dist = LowRankNormal(loc, factor, diag)
    x = dist.sample()
    tops, lefts = torch.tensor([0, 2, 3]), torch.tensor([0, 1, 3])
    mask = M.patch_masks(shape, tops, lefts, size=3)
    assert mask.sum(-1).tolist() == [9, 9, 9]
    assert mask[1].reshape(6, 6)[2:5, 1:4].all()
    out = M.inpaint(dist, x, mask)
    for i in range(b):
        cov = factor[i] @ factor[i].T + torch.diag(diag[i])
        h, mean_h, logp = _dense_conditional(loc[i], cov, mask[i], x[i])
        assert torch.allclose(out.cond_mean[i, h], mean_h, atol=1e-8)
        assert float(out.hidden_nll[i]) == pytest.approx(float(-logp), abs=1e-6)
        marginal = torch.distributions.MultivariateNormal(loc[i, h], cov[h][:, h]).log_prob(x[i, h])
        assert float(out.hidden_nll_uncond[i]) == pytest.approx(float(-marginal), abs=1e-6)
        assert float(out.sq_err_cond[i]) == pytest.approx(float(((x[i, h] - mean_h) ** 2).sum()), abs=1e-8)
        assert float(out.sq_err_uncond[i]) == pytest.approx(float(((x[i, h] - loc[i, h]) ** 2).sum()), abs=1e-10)
    assert out.num_hidden.tolist() == [27, 27, 27]


def test_inpaint_diagonal_leaves_hidden_mean():
    gen = torch.Generator().manual_seed(8)
    loc = torch.rand(2, 16, generator=gen, dtype=torch.float64)
    var = 0.01 + torch.rand(2, 16, generator=gen, dtype=torch.float64)
    dist = DiagonalNormal(loc, var)
    x = torch.rand(2, 16, generator=gen, dtype=torch.float64)
    mask = M.patch_masks((1, 4, 4), torch.tensor([0, 1]), torch.tensor([1, 2]), size=2)
    out = M.inpaint(dist, x, mask)
    hidden = ~mask
    assert torch.equal(out.cond_mean[hidden], loc[hidden])
    per_pixel = -torch.distributions.Normal(loc, var.sqrt()).log_prob(x)
    assert out.hidden_nll.tolist() == pytest.approx((per_pixel * hidden).sum(-1).tolist(), abs=1e-5)
    assert torch.equal(out.sq_err_cond, out.sq_err_uncond)
    assert out.hidden_nll_uncond.tolist() == pytest.approx(out.hidden_nll.tolist(), abs=1e-5)


def test_most_uncertain_patch_and_random_corners():
    var = torch.full((2, 2 * 20 * 20), 0.1)
    grid = var.reshape(2, 2, 20, 20)
    grid[0, 1, 5:10, 12:17] = 5.0
    grid[1, 0, 15:20, 0:5] = 5.0
    tops, lefts = M.most_uncertain_patch(var, (2, 20, 20), size=5)
    assert tops.tolist() == [5, 15] and lefts.tolist() == [12, 0]
    t, l = M.random_patch_corners(500, (1, 20, 30), size=10, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 0 and int(t.max()) == 10 and int(l.max()) == 20
    with pytest.raises(ValueError, match="size"):
        M.patch_masks((1, 8, 8), t[:1], l[:1], size=10)


def test_random_pixel_and_half_masks():
    shape = (3, 5, 7)  # odd sides: halves are the floor
    m = M.random_pixel_masks(4, shape, 0.5, generator=torch.Generator().manual_seed(0))
    grid = m.reshape(4, 3, 5, 7)
    assert (grid.sum((2, 3)) == 17).all()  # exactly ⌊35/2⌋ positions per image and channel
    assert (grid == grid[:, :1]).all()  # a position is observed in all channels together
    assert not torch.equal(grid[0], grid[1])  # independent per image
    again = M.random_pixel_masks(4, shape, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, again)
    top = M.half_masks(2, shape, "top").reshape(2, 3, 5, 7)
    assert top[:, :, :2].all() and not top[:, :, 2:].any()
    left = M.half_masks(2, shape, "left").reshape(2, 3, 5, 7)
    assert left[..., :3].all() and not left[..., 3:].any()
    with pytest.raises(ValueError, match="^side:"):
        M.half_masks(1, shape, "bottom")
    with pytest.raises(ValueError, match="^fraction:"):
        M.random_pixel_masks(1, shape, 1.5)


def _family_masks(family: str, dist, shape, gen):
    b = dist.loc.shape[0]
    if family == "random50":
        return M.random_pixel_masks(b, shape, 0.5, generator=gen)
    if family == "patch10":
        return M.patch_masks(shape, *M.random_patch_corners(b, shape, 10, generator=gen), 10)
    if family == "patch10_maxvar":
        return M.patch_masks(shape, *M.most_uncertain_patch(dist.variance, shape, 10), 10)
    return M.half_masks(b, shape, family.removesuffix("_half"))


@pytest.mark.parametrize("family", M.INPAINT_FAMILIES)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_inpaint_families_equal_dense_closed_form(family, eps):
    """Each mask family on a planted low-rank Gaussian (2×12×12, R = 4, a different μ and P per image): conditional
    mean, conditional and marginal NLL of the hidden pixels and the squared errors equal the dense float64
    Gaussian conditional, at the paper's ε and at a calibrated-size one."""
    gen = torch.Generator().manual_seed(13)
    shape, b, r = (2, 12, 12), 3, 4
    d = 288
    loc = torch.rand(b, d, generator=gen, dtype=torch.float64)
    factor = 0.2 * torch.randn(b, d, r, generator=gen, dtype=torch.float64)
    dist = LowRankNormal(loc, factor, torch.tensor(eps, dtype=torch.float64))
    x = loc + (factor @ torch.randn(b, r, 1, generator=gen, dtype=torch.float64)).squeeze(-1)
    x = x + 0.05 * torch.randn(b, d, generator=gen, dtype=torch.float64)  # residual outside span(P)
    mask = _family_masks(family, dist, shape, gen)
    out = M.inpaint(dist, x, mask)
    for i in range(b):
        cov = factor[i] @ factor[i].T + eps * torch.eye(d, dtype=torch.float64)
        h, mean_h, logp = _dense_conditional(loc[i], cov, mask[i], x[i])
        assert torch.allclose(out.cond_mean[i, h], mean_h, atol=1e-8, rtol=1e-8)
        assert float(out.hidden_nll[i]) == pytest.approx(float(-logp), rel=1e-7, abs=1e-5)
        marginal = torch.distributions.MultivariateNormal(loc[i, h], cov[h][:, h]).log_prob(x[i, h])
        assert float(out.hidden_nll_uncond[i]) == pytest.approx(float(-marginal), rel=1e-7, abs=1e-5)
        assert float(out.sq_err_cond[i]) == pytest.approx(float(((x[i, h] - mean_h) ** 2).sum()), rel=1e-8)
        assert float(out.sq_err_uncond[i]) == pytest.approx(float(((x[i, h] - loc[i, h]) ** 2).sum()), rel=1e-12)
        assert int(out.num_hidden[i]) == h.numel()
    expected_hidden = dict(random50=72, patch10=44, patch10_maxvar=44, top_half=72, left_half=72)[family]  # of 144
    assert out.num_hidden.tolist() == [2 * expected_hidden] * b


# ------------------------------------------------------------------------------------------------- Fréchet distance

def test_frechet_distance_known_answers():
    gen = torch.Generator().manual_seed(14)
    a = torch.randn(500, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert M.frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-9)
    centred = a - a.mean(0)
    # b = 2a: (√1 − √4)² per eigenvalue, so d² = tr S
    assert M.frechet_distance(centred, 2 * centred) == pytest.approx(float(torch.trace(torch.cov(centred.T))), rel=1e-9)
    # general case against tr (S_a S_b)^{1/2} from the (real, non-negative) eigenvalues of the product S_a S_b
    b = torch.randn(300, 6, generator=gen, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64) + 0.3
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    cross = torch.linalg.eigvals(sa @ sb).real.clamp_min(0).sqrt().sum()
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum() + torch.trace(sa) + torch.trace(sb) - 2 * cross)
    assert M.frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="^a, b:"):
        M.frechet_distance(a, b[:, :5])


# ------------------------------------------------------------------------------------------------- spectrum

def test_spectrum_white_noise():
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(200, 1, 32, 32, generator=gen, dtype=torch.float64)
    b = 2 * torch.randn(200, 1, 32, 32, generator=gen, dtype=torch.float64)
    spec = M.radial_log_power_spectrum(a)
    assert spec.shape == (17,)
    assert spec[1:].abs().max() < 0.05  # flat at log10(σ²) = 0
    assert M.spectrum_distance(a, b) == pytest.approx(math.log10(4), abs=0.03)
    assert M.spectrum_distance(a, a) == 0.0
    # A smooth field has less high-frequency power than white noise of the same variance.
    smooth = _ar1_field(200, 32, 32, 0.9, 0.9, gen)
    s = M.radial_log_power_spectrum(smooth)
    assert s[1] > spec[1] + 0.5 and s[-1] < spec[-1] - 0.5


# ------------------------------------------------------------------------------------------------- PCA baseline

@pytest.mark.parametrize("n", [60, 3000])  # N < D (Gram matrix) and N > D (covariance)
def test_pca_recovers_planted_subspace(n):
    gen = torch.Generator().manual_seed(10)
    d, r, sigma = 80, 4, 0.05
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    scales = torch.tensor([3.0, 2.0, 1.5, 1.0], dtype=torch.float64)
    x = (torch.randn(n, r, generator=gen, dtype=torch.float64) * scales) @ basis.T
    x = x + sigma * torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.5
    fit = P.fit_pca(x, r)
    # Perturbation theory: angle ≈ σ·sqrt(D/N)/s_min rad ≈ 3.3° at N = 60, 0.5° at N = 3000.
    assert M.span_angle_deg(fit.components, basis) < (6.0 if n < d else 1.0)
    assert fit.noise_var == pytest.approx(sigma ** 2, rel=0.15)
    assert fit.eigenvalues.tolist() == pytest.approx((scales ** 2 + sigma ** 2).tolist(), rel=0.35)
    assert fit.explained_variance_ratio > 0.95
    dist = fit.distribution(2, dtype=torch.float64)
    assert dist.batch_shape == (2,) and dist.cov_factor.shape == (2, d, r)
    cov = fit.factor @ fit.factor.T + fit.noise_var * torch.eye(d, dtype=torch.float64)
    dense = torch.distributions.MultivariateNormal(fit.mean, cov).log_prob(x[:2])
    assert torch.allclose(dist.log_prob(x[:2]), dense, atol=1e-6)


def test_pca_randomised_matches_exact(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 40, generator=gen, dtype=torch.float64)
    x = x + 0.01 * torch.randn(300, 40, generator=gen, dtype=torch.float64)
    exact = P.fit_pca(x, 5)
    monkeypatch.setattr(P, "_EXACT_LIMIT", 10)
    approx = P.fit_pca(x, 5)
    assert M.span_angle_deg(exact.components, approx.components) < 0.1
    assert approx.noise_var == pytest.approx(exact.noise_var, rel=1e-3)
    with pytest.raises(ValueError, match="rank"):
        P.fit_pca(x, 40)


# ------------------------------------------------------------------------------------------------- evaluate() on runs

EVAL_KEYS = ("test_nll_bpd", "elbo_bpd", "iwae_k", "kl_nats", "target_kl", "residual_corr_samples",
             "residual_corr_data", "span_capture", "correction_rmse_uncond", "correction_rmse_cond", "correction_nll_bpd",
             "correction_rmse_uncond_maxvar", "correction_rmse_cond_maxvar", "correction_nll_bpd_maxvar",
             "correction_nll_bpd_uncond", "correction_nll_bpd_uncond_maxvar",
             "spectrum_dist_mean", "spectrum_dist_samples", "dataset", "head", "rank", "latent", "epochs",
             "train_seconds", "eps_calibrated", "diag_scale_calibrated", "test_nll_bpd_calibrated",
             "val_recon_nll_bpd", "val_recon_nll_bpd_calibrated") + tuple(
    key for f in M.INPAINT_FAMILIES for key in (
        f"correction_rmse_uncond_{f}", f"correction_rmse_cond_{f}", f"correction_rmse_cond_{f}_cal",
        f"correction_nll_bpd_uncond_{f}", f"correction_nll_bpd_cond_{f}", f"correction_nll_bpd_uncond_{f}_cal",
        f"correction_nll_bpd_cond_{f}_cal"))


@pytest.fixture(scope="module")
def smoke_runs(trained_smoke_run, tmp_path_factory):
    """The session's smoke runs (conftest), copied: evaluate writes eval_test.json and calibration.json into them."""
    from conftest import copy_run

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, overrides in (("lowrank", dict(head="lowrank")), ("diagonal", dict(head="diagonal")),
                            ("synthetic", dict(head="lowrank", dataset="synthetic", max_items=16))):
        runs[name] = copy_run(trained_smoke_run(**overrides), root / name)
    return runs


def test_evaluate_lowrank_run(smoke_runs):
    import json

    from sosvae_lib.evaluate import evaluate

    run = smoke_runs["lowrank"]
    out = evaluate(run, k=4, progress=False)
    for key in EVAL_KEYS:
        assert key in out, key
        if isinstance(out[key], float):
            assert math.isfinite(out[key]), key
    assert "span_angle_deg" not in out  # no ground truth for orl
    assert out["iwae_k"] == 4 and out["head"] == "lowrank" and out["rank"] == 2 and out["dequantized"]
    assert out["num_images"] == 40 and out["epochs"] == 1 and out["target_kl"] == 5.0
    # The IWAE bound is at least as tight as the ELBO on average (same model, same images).
    assert out["test_nll_bpd"] <= out["elbo_bpd"] + 1e-6
    assert 0.0 < out["span_capture"] < 1.0 and 0.0 < out["pca_span_capture"] < 1.0
    assert out["pca_rank"] == 2 and math.isfinite(out["pca_test_nll_bpd"])
    # calibration on the val split: ε moves up from the trained 1e-5 and every NLL improves
    assert out["diag_scale_calibrated"] > 1 and out["eps_calibrated"] == pytest.approx(1e-5 * out["diag_scale_calibrated"])
    assert out["val_recon_nll_bpd_calibrated"] < out["val_recon_nll_bpd"]
    assert out["test_nll_bpd_calibrated"] < out["test_nll_bpd"]
    assert out["calibration_images"] == 40  # orl's val split
    from sosvae_lib.runs import Run
    assert Run(run).calibration().scale == out["diag_scale_calibrated"]
    # the first version's keys are the patch10 family's
    assert out["correction_rmse_cond"] == out["correction_rmse_cond_patch10"]
    assert out["correction_nll_bpd_uncond_maxvar"] == out["correction_nll_bpd_uncond_patch10_maxvar"]
    for f in M.INPAINT_FAMILIES:  # a wider diagonal makes the hidden pixels far more probable
        assert out[f"correction_nll_bpd_cond_{f}_cal"] < out[f"correction_nll_bpd_cond_{f}"]
    # the PPCA baseline's σ² is its maximum-likelihood value: the calibrated keys repeat the trained ones
    assert out["pca_test_nll_bpd_calibrated"] == out["pca_test_nll_bpd"] and out["pca_diag_scale_calibrated"] == 1.0
    assert out["pca_correction_rmse_cond_top_half_cal"] == out["pca_correction_rmse_cond_top_half"]
    # real inpainting (issue 19): every family scored for the model and the baseline; PPCA has no latent, so its
    # real inpainting is its correction (the same conditional on the same pixels)
    from sosvae_lib.inpaint import REAL_INPAINT_FAMILIES
    for f in REAL_INPAINT_FAMILIES:
        for prefix in ("", "pca_"):
            for key in (f"real_inpaint_rmse_{f}", f"real_inpaint_nll_bpd_{f}", f"real_inpaint_rmse_{f}_train_mean"):
                assert math.isfinite(out[prefix + key]) and out[prefix + key] > 0, prefix + key
        assert out[f"pca_real_inpaint_rmse_{f}"] == pytest.approx(out[f"pca_correction_rmse_cond_{f}"], rel=1e-9)
    assert not any(key.startswith("face_") for key in out)  # one-channel data: no face metrics
    saved = json.loads((run / "eval_test.json").read_text())
    assert saved == pytest.approx(out)
    # Everything random is seeded: a repeat gives the same numbers; another seed changes the stochastic ones.
    again = evaluate(run, k=4, progress=False, write=False, pca=False)
    assert again["test_nll_bpd"] == out["test_nll_bpd"] and again["correction_rmse_cond"] == out["correction_rmse_cond"]
    other = evaluate(run, k=4, progress=False, write=False, pca=False, seed=1, num_images=10)
    assert other["num_images"] == 10 and other["test_nll_bpd"] != out["test_nll_bpd"]


def test_evaluate_diagonal_run(smoke_runs):
    from sosvae_lib.evaluate import evaluate

    out = evaluate(smoke_runs["diagonal"], k=2, progress=False, pca=False, write=False)
    assert out["rank"] == 0 and out["span_capture"] == 0.0
    # Pixel-wise independence: conditioning leaves hidden pixels alone and samples carry white noise.
    assert out["correction_rmse_cond"] == out["correction_rmse_uncond"]
    assert out["correction_rmse_cond_maxvar"] == out["correction_rmse_uncond_maxvar"]
    assert out["correction_nll_bpd"] == pytest.approx(out["correction_nll_bpd_uncond"], abs=1e-6)
    for f in M.INPAINT_FAMILIES:
        assert out[f"correction_rmse_cond_{f}"] == out[f"correction_rmse_uncond_{f}"]
        assert out[f"correction_nll_bpd_cond_{f}"] == pytest.approx(out[f"correction_nll_bpd_uncond_{f}"], abs=1e-6)
        assert out[f"correction_rmse_cond_{f}_cal"] is None  # no calibration for the pixel-wise head
    assert out["eps_calibrated"] is None and out["test_nll_bpd_calibrated"] is None
    assert abs(out["residual_corr_samples"]) < 0.05
    assert not any(key.startswith("pca_") for key in out)


def test_evaluate_synthetic_span_angle_and_cli(smoke_runs, capsys):
    import json

    from sosvae_lib.evaluate import main

    run = smoke_runs["synthetic"]
    assert main([str(run), "--k", "2", "--num-images", "50", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["dequantized"]  # float data are scored as they are
    assert 0.0 <= out["span_angle_deg"] <= 90.0 and 0.0 <= out["pca_span_angle_deg"] <= 90.0
    assert json.loads((run / "eval_test.json").read_text())["num_images"] == 50


def test_evaluate_rejects_bad_options(smoke_runs, tmp_path, capsys):
    from sosvae_lib.evaluate import evaluate, main

    with pytest.raises(ValueError, match="^k:"):
        evaluate(smoke_runs["lowrank"], k=0)
    with pytest.raises(ValueError, match="^split:"):
        evaluate(smoke_runs["lowrank"], split="dev")
    with pytest.raises(ValueError, match="^colour:"):
        evaluate(smoke_runs["lowrank"], colour=True)
    with pytest.raises(ValueError, match="^calibrate:"):
        evaluate(smoke_runs["lowrank"], calibrate=1)
    with pytest.raises(ValueError, match="^face_images:"):
        evaluate(smoke_runs["lowrank"], face_images=1)
    with pytest.raises(FileNotFoundError, match="run_dir"):
        evaluate(tmp_path / "missing")
    assert main([str(tmp_path), "--no-progress"]) == 2
    assert "run_dir" in capsys.readouterr().err


def test_evaluate_pca_on_planted_model():
    """PPCA fitted to samples of a known low-rank Gaussian scores like the truth itself."""
    from sosvae_lib.evaluate import evaluate_pca

    gen = torch.Generator().manual_seed(12)
    shape, r = (1, 8, 8), 3
    d = 64
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    truth = LowRankNormal(0.5 + 0.1 * torch.rand(d, generator=gen, dtype=torch.float64),
                          basis * torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64),
                          torch.full((d,), 0.01 ** 2, dtype=torch.float64))
    torch.manual_seed(0)
    train_x, test_x = truth.sample((3000,)), truth.sample((200,))
    fit = P.fit_pca(train_x, r)
    with pytest.raises(ValueError, match="^patch:"):
        evaluate_pca(fit, test_x.reshape(200, *shape), dequantize=False, patch=10)  # 10×10 patch on 8×8 images
    out = evaluate_pca(fit, test_x.reshape(200, *shape), dequantize=False, patch=4, true_factor=truth.cov_factor)
    exact = float(M.gaussian_bpd(truth, test_x).mean())
    assert out["test_nll_bpd"] == pytest.approx(exact, abs=0.01)
    assert out["span_angle_deg"] < 2.0  # perturbation theory: σ·sqrt(D/N)/s_min ≈ 0.84°
    # Samples of the right Gaussian have the data's spectrum; the single mean image lacks its variation.
    assert out["spectrum_dist_samples"] < 0.1 < out["spectrum_dist_mean"]
    assert out["span_capture"] > 0.95  # the residual x − m is almost all in the planted span
    # Conditioning on a 4×4 patch pins the 3 factor coefficients: hidden RMSE drops to about the noise level.
    assert out["correction_rmse_cond"] < 0.02 < 0.5 * out["correction_rmse_uncond"]
    assert out["correction_nll_bpd"] < out["correction_nll_bpd_uncond"] - 0.1  # revealed pixels inform the rest
    assert out["residual_corr_samples"] == pytest.approx(out["residual_corr_data"], abs=0.05)
    # every mask family: revealing pixels of the true low-rank Gaussian pins the factor coefficients
    for f in ("random50", "top_half", "left_half"):
        assert out[f"correction_rmse_cond_{f}"] < 0.02 < 0.5 * out[f"correction_rmse_uncond_{f}"]
        assert out[f"correction_nll_bpd_cond_{f}"] < out[f"correction_nll_bpd_uncond_{f}"] - 0.1
    assert out["eps_calibrated"] == fit.noise_var and out["test_nll_bpd_calibrated"] == out["test_nll_bpd"]


# ------------------------------------------------------------------------------------------------- evaluate: issue 17

def _small_run(parent, name: str, **overrides):
    from sosvae_lib.config import TrainConfig
    from sosvae_lib.train import train

    train(TrainConfig.preset("smoke", **overrides), parent / name, progress=False)
    return parent / name


@pytest.mark.parametrize("size", [(9, 7), (4, 4)])
def test_evaluate_default_patch_fits_small_images(tmp_path, size):
    """issue 17 item 13: the default 10×10 patch refused valid 9×7 and 4×4 runs; it is now capped at half the
    shorter side (as the editor figures cap theirs), and only a patch given explicitly is refused when too large."""
    from sosvae_lib.evaluate import evaluate

    run = _small_run(tmp_path, "run", image_size=size, levels=1, max_items=8)
    out = evaluate(run, k=1, num_images=6, progress=False, write=False, pca=False)
    assert out["patch"] == min(size) // 2
    for f in M.INPAINT_FAMILIES:
        assert math.isfinite(out[f"correction_rmse_cond_{f}"]) and math.isfinite(out[f"correction_nll_bpd_cond_{f}"]), f
    with pytest.raises(ValueError, match="^patch: must be at most the image side"):
        evaluate(run, patch=min(size) + 1, k=1, num_images=6, progress=False, write=False, pca=False)


def test_evaluate_skips_the_ppca_baseline_of_a_one_image_run(tmp_path):
    """issue 17 item 11: a `--max-items 1` run's evaluation failed with "rank: … got 0" (PPCA needs 2 training
    images); the baseline is now skipped with a note in the results and a warning."""
    from sosvae_lib.evaluate import evaluate
    from sosvae_lib.tables import rows_from_eval

    run = _small_run(tmp_path, "run", max_items=1)
    with pytest.warns(RuntimeWarning, match="pca: skipped"):
        out = evaluate(run, k=1, num_images=4, progress=False, write=False)
    assert out["pca_skipped"] == "the PPCA baseline needs at least 2 training images; the run has 1"
    assert "pca_test_nll_bpd" not in out and math.isfinite(out["test_nll_bpd"])
    assert len(rows_from_eval(out)) == 1  # no baseline row in the tables


def test_evaluate_takes_a_moved_data_root(tmp_path, capsys):
    """issue 17 item 12: a moved data root said "pass root=…" but evaluate had no root option nor --root."""
    import json
    import shutil
    from pathlib import Path

    from sosvae_lib.data import load_dataset
    from sosvae_lib.evaluate import evaluate, main

    original = Path(load_dataset("orl", "test", image_size=16, max_items=1).root)
    shutil.copytree(original, tmp_path / "faces")
    run = _small_run(tmp_path, "run", root=str(tmp_path / "faces"), max_items=8)
    (tmp_path / "faces").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="root="):
        evaluate(run, k=1, num_images=4, progress=False, write=False, pca=False)
    out = evaluate(run, root=tmp_path / "moved", k=1, num_images=4, progress=False, write=False)
    assert out["num_images"] == 4 and math.isfinite(out["pca_test_nll_bpd"])
    assert main([str(run), "--root", str(tmp_path / "moved"), "--k", "1", "--num-images", "4", "--no-pca",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 4
    assert main([str(run), "--root", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(TypeError, match="^root:"):
        evaluate(run, root=3)


def test_evaluate_records_the_epochs_the_checkpoint_was_trained_for(tmp_path):
    """issue 17 item 15: a checkpoint at epoch 1 of 3 was recorded as "epochs": 3 without a word."""
    import json

    from sosvae_lib.evaluate import evaluate

    run = _small_run(tmp_path, "run", max_items=8, epochs=1)
    finished = evaluate(run, k=1, num_images=4, progress=False, write=False, pca=False)
    assert (finished["epochs"], finished["complete"]) == (1, True)
    # what a training of 3 epochs killed after its first leaves: the checkpoint at epoch 1, no summary.json
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["epochs"] = 3
    torch.save(state, run / "checkpoint.pt")
    (run / "config.json").write_text(json.dumps(state["config"]))
    (run / "summary.json").unlink()
    with pytest.warns(RuntimeWarning, match="after epoch 1 of 3"):
        out = evaluate(run, k=1, num_images=4, progress=False, write=False, pca=False)
    assert (out["epochs"], out["complete"]) == (1, False)
    assert out["train_seconds"] == pytest.approx(state["train_seconds"])
    assert (out["epochs_planned"], finished["epochs_planned"]) == (3, 1)
    from sosvae_lib.tables import rows_from_eval, to_csv

    row = rows_from_eval(out)[0]
    assert (row["epochs"], row["epochs_planned"], row["complete"]) == (1, 3, False)
    assert "epochs_planned,complete" in to_csv([row]).splitlines()[0]
