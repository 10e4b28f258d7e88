"""Known-answer tests of sosvae_lib.calibration (issue 12, item 2): the spectral NLL against dense float64
references, recovery of a planted ε and of a planted multiplier of d, the search, and the consumers' choice."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sosvae_lib import calibration as C
from sosvae_lib import metrics as M
from sosvae_lib.distributions import DiagonalNormal, LowRankNormal
from sosvae_lib.runs import Run

torch.set_num_threads(1)
F64 = torch.float64


def _planted(n: int, d: int, r: int, diag: torch.Tensor, seed: int, scale: float = 0.2):
    """Images x_b ~ N(μ_b, P_b P_bᵀ + diag), a different μ_b and P_b for each image (as a decoder gives)."""
    gen = torch.Generator().manual_seed(seed)
    loc = torch.rand(n, d, generator=gen, dtype=F64)
    factor = scale * torch.randn(n, d, r, generator=gen, dtype=F64)
    x = loc + (factor @ torch.randn(n, r, 1, generator=gen, dtype=F64)).squeeze(-1)
    x = x + diag.sqrt() * torch.randn(n, d, generator=gen, dtype=F64)
    return loc, factor, x


def _dense_nll(loc, factor, diag, x):
    cov = factor @ factor.mT + torch.diag_embed(diag.expand_as(loc))
    return -torch.distributions.MultivariateNormal(loc, cov).log_prob(x)


@pytest.mark.parametrize("scalar", [True, False])
def test_spectral_nll_equals_dense_reference(scalar):
    gen = torch.Generator().manual_seed(0)
    n, d, r = 4, 40, 3
    diag = torch.tensor(1e-5, dtype=F64) if scalar else 1e-3 + 1e-2 * torch.rand(n, d, generator=gen, dtype=F64)
    loc, factor, x = _planted(n, d, r, torch.tensor(1e-2, dtype=F64), seed=1)
    factor[1, :, 2] = 0.0  # a rank-deficient factor is exact too
    stats = C.diag_scale_statistics(loc, factor, diag, x, chunk=3)
    assert stats.num_images == n and stats.sq_singular.shape == (n, r)
    for s in (1.0, 37.0, 1e3):
        dense = _dense_nll(loc, factor, s * diag, x)
        assert stats.nll(s).tolist() == pytest.approx(dense.tolist(), rel=1e-10, abs=1e-6)
        ours = -LowRankNormal(loc, factor, s * diag).log_prob(x)  # the distributions module agrees
        assert stats.nll(s).tolist() == pytest.approx(ours.tolist(), rel=1e-9, abs=1e-5)
    # batches of statistics concatenate into the statistics of all images
    parts = C.DiagScaleStats.cat([C.diag_scale_statistics(loc[:1], factor[:1], diag if scalar else diag[:1], x[:1]),
                                  C.diag_scale_statistics(loc[1:], factor[1:], diag if scalar else diag[1:], x[1:])])
    assert torch.allclose(parts.nll(5.0), stats.nll(5.0), rtol=1e-12)


def test_zero_factor_gives_the_mean_square_exactly():
    """P = 0: N(μ, ε I) has the closed-form maximum-likelihood ε = Σ r² / (N D)."""
    gen = torch.Generator().manual_seed(2)
    x = 0.1 * torch.randn(5, 30, generator=gen, dtype=F64)
    cal = C.calibrate_diagonal(torch.zeros(5, 30, dtype=F64), torch.zeros(5, 30, 2, dtype=F64), 1e-5, x, tol=1e-8)
    expected = float((x ** 2).mean())
    assert cal.eps == pytest.approx(expected, rel=1e-6)
    assert cal.scale == pytest.approx(expected / 1e-5, rel=1e-6) and cal.trained_eps == 1e-5
    assert cal.nll_calibrated == pytest.approx(0.5 * 30 * (math.log(2 * math.pi * expected) + 1), rel=1e-9)


@pytest.mark.parametrize("eps_true", [1e-3, 2e-2])
def test_recovers_the_planted_eps(eps_true):
    """Trained ε = 1e-5 (the paper's), data drawn with ε_true: the fit returns ε_true within 5 %.

    Statistical error of the maximum-likelihood ε: relative std ≈ sqrt(2 / (N (D − R))) = 1.4 % for N = 40,
    D = 256, R = 5, so 5 % is 3.5 standard deviations."""
    loc, factor, x = _planted(40, 256, 5, torch.tensor(eps_true, dtype=F64), seed=3)
    cal = C.calibrate_diagonal(loc, factor, torch.tensor(1e-5), x)
    assert cal.eps == pytest.approx(eps_true, rel=0.05)
    assert not cal.at_bound and cal.num_images == 40 and cal.num_dims == 256
    # the calibrated NLL is the minimum: lower than at the trained ε and than at ε_true ± 20 %
    assert cal.nll_calibrated < cal.nll_trained
    stats = C.diag_scale_statistics(loc, factor, 1e-5, x)
    for other in (0.8 * cal.eps, 1.2 * cal.eps):
        assert stats.total_nll(other / 1e-5) > stats.total_nll(cal.scale)
    assert cal.bpd_calibrated == pytest.approx(float(M.bits_per_dim(cal.nll_calibrated, 256)))


def test_recovers_a_planted_multiplier_of_a_learned_diagonal():
    gen = torch.Generator().manual_seed(4)
    n, d, r, s_true = 40, 256, 5, 7.0
    learned = 1e-4 + 1e-3 * torch.rand(n, d, generator=gen, dtype=F64)
    loc, factor, x = _planted(n, d, r, s_true * learned, seed=5)
    cal = C.calibrate_diagonal(loc, factor, learned, x)
    assert cal.eps is None and cal.trained_eps is None
    assert cal.scale == pytest.approx(s_true, rel=0.05)


def test_search_bounds_and_errors():
    loc, factor, x = _planted(10, 50, 2, torch.tensor(1e-2, dtype=F64), seed=6)
    with pytest.warns(RuntimeWarning, match="bounds"):
        cal = C.calibrate_diagonal(loc, factor, 1e-5, x, bounds=(1e-8, 1e-4))  # true ε = 1e-2 lies outside
    assert cal.at_bound and cal.eps == pytest.approx(1e-4, rel=1e-3)
    stats = C.diag_scale_statistics(loc, factor, 1e-5, x)
    with pytest.raises(ValueError, match="^bounds:"):
        C.fit_diag_scale(stats, (1.0, 0.5))
    with pytest.raises(ValueError, match="^grid:"):
        C.fit_diag_scale(stats, grid=2)
    with pytest.raises(ValueError, match="^cov_diag:"):
        C.diag_scale_statistics(loc, factor, torch.tensor(-1.0), x)
    with pytest.raises(ValueError, match="^x:"):
        C.diag_scale_statistics(loc, factor, 1e-5, x[0])
    with pytest.raises(ValueError, match="^cov_factor:"):
        C.diag_scale_statistics(loc, factor[:, :10], 1e-5, x)


# ------------------------------------------------------------------------------------------------- consumers

def test_rescale_diagonal_and_conditioning_at_the_calibrated_eps():
    gen = torch.Generator().manual_seed(7)
    loc, factor, x = _planted(3, 36, 3, torch.tensor(1e-2, dtype=F64), seed=8)
    dist = LowRankNormal(loc, factor, torch.tensor(1e-5, dtype=F64))
    cal = LowRankNormal(loc, factor, torch.tensor(1e-5, dtype=F64) * 400)
    scaled = C.rescale_diagonal(dist, 400.0)
    assert scaled.cov_diag.stride() == (0, 0)  # a scalar diagonal stays scalar
    assert torch.allclose(scaled.log_prob(x), cal.log_prob(x), rtol=1e-12)
    # conditioning the rescaled distribution: the dense float64 conditional at ε = 4e-3
    mask = torch.rand(3, 36, generator=gen) < 0.5
    cond = scaled.condition(mask, x)
    for i in range(3):
        o, h = mask[i].nonzero().squeeze(-1), (~mask[i]).nonzero().squeeze(-1)
        cov = factor[i] @ factor[i].T + 4e-3 * torch.eye(36, dtype=F64)
        mean_h = loc[i, h] + cov[h][:, o] @ torch.linalg.solve(cov[o][:, o], x[i, o] - loc[i, o])
        assert torch.allclose(cond.loc[i, h], mean_h, atol=1e-9)
    learned = LowRankNormal(loc, factor, torch.full((3, 36), 2e-3, dtype=F64))
    assert torch.allclose(C.rescale_diagonal(learned, 0.5).cov_diag, torch.full((3, 36), 1e-3, dtype=F64))
    with pytest.raises(ValueError, match="^dist:"):
        C.rescale_diagonal(cond, 2.0)
    with pytest.raises(TypeError, match="^dist:"):
        C.rescale_diagonal(DiagonalNormal(loc, torch.ones_like(loc)), 2.0)
    with pytest.raises(ValueError, match="^scale:"):
        C.rescale_diagonal(dist, -1.0)


def _tiny_vae(head: str = "lowrank"):
    from sosvae_lib.model import VAE

    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent=3, head=head, rank=2, width=4, levels=2).eval()  # float32, as trained
    with torch.no_grad():  # a factor far from its near-zero initialisation
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_model_wrapper_iwae_variant_and_calibrate_model():
    model = _tiny_vae()
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    cal = C.calibrate_model(model, images, batch_size=4, dequantize=False)
    # the model-level fit is the tensor-level fit on the reconstructions p(x | z = posterior mean)
    with torch.no_grad():
        obs = model.decode(model.encode(images).loc)
    ref = C.calibrate_diagonal(obs.loc, obs.cov_factor, torch.tensor(model.head.eps), images.reshape(6, -1))
    assert cal.scale == pytest.approx(ref.scale, rel=1e-9) and cal.eps == pytest.approx(ref.eps, rel=1e-9)
    assert cal.nll_calibrated <= cal.nll_trained
    wrapped = C.with_diag_scale(model, cal)
    assert C.with_diag_scale(model, None) is model
    assert wrapped.latent_dim == 3 and wrapped.rank == 2
    with torch.no_grad():
        assert torch.allclose(wrapped.decode(model.encode(images).loc).cov_diag, torch.full((6, 64), cal.eps))
    # IWAE of the wrapped model = the 'variants' bound from the same importance samples
    both = M.iwae_log_likelihood(model, images, k=3, generator=torch.Generator().manual_seed(1),
                                 variants=dict(cal=lambda p: C.rescale_diagonal(p, cal.scale)))
    alone = M.iwae_log_likelihood(wrapped, images, k=3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(both["log_likelihood_cal"], alone["log_likelihood"], rtol=1e-6)
    assert float(both["log_likelihood_cal"].mean()) > float(both["log_likelihood"].mean())
    with pytest.raises(ValueError, match="^model:"):
        C.calibrate_model(_tiny_vae("diagonal"), images)
    with pytest.raises(ValueError, match="^model:"):
        C.DiagScaled(_tiny_vae("diagonal"), 2.0)
    # lowrank-diag: a multiplier of the learned d, no single ε
    cal_d = C.calibrate_model(_tiny_vae("lowrank-diag"), images, dequantize=False)
    assert cal_d.eps is None and cal_d.scale > 0


def test_calibration_record_round_trip(tmp_path):
    assert Run(tmp_path).calibration() is None
    cal = C.Calibration(scale=1000.0, eps=1e-2, trained_eps=1e-5, nll_trained=5.0, nll_calibrated=1.0,
                        num_images=3, num_dims=10, at_bound=False)
    Run(tmp_path).calibration_path.write_text(json.dumps(dict(cal.to_dict(), split="val", seed=0)))
    assert Run(tmp_path).calibration() == cal


# ------------------------------------------------------------------------------------------------- bad input (issue 17)

def test_calibration_api_rejects_bad_input_naming_it(tmp_path):
    """issue 17 items 10 and 11: each bad input is one ValueError/TypeError naming the argument (or the file), as
    given, raised before any decoder pass; before, NaN images gave torch's _LinAlgError, a wrong size "expanded
    size", one-element bounds an IndexError, batch_size=0 "range() arg 3 must not be zero", bounds=(1, 1e-3) was
    reported as (1e5, 100), and a corrupt or incomplete calibration.json a JSONDecodeError / KeyError."""
    model = _tiny_vae()
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    nan = images.clone()
    nan[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="^images: has NaN"):
        C.calibrate_model(model, nan, dequantize=False)
    with pytest.raises(ValueError, match=r"^images: must be \[N, C, H, W\] with \(C, H, W\) = \(1, 8, 8\)"):
        C.calibrate_model(model, torch.rand(4, 1, 6, 6), dequantize=False)
    with pytest.raises(ValueError, match=r"^bounds: .*got \(0\.001,\)"):
        C.calibrate_model(model, images, bounds=(1e-3,))
    with pytest.raises(ValueError, match=r"^bounds: .*got \(1, 0\.001\)"):  # as given, not as (1e5, 100)
        C.calibrate_model(model, images, bounds=(1, 1e-3))
    with pytest.raises(ValueError, match="^batch_size:"):
        C.calibrate_model(model, images, batch_size=0)
    with pytest.raises(ValueError, match="^images: no images"):
        C.calibrate_model(model, images[:0])
    with pytest.raises(ValueError, match="^x: must be finite"):
        C.diag_scale_statistics(torch.zeros(2, 5), torch.ones(2, 5, 1), 1e-3, torch.full((2, 5), float("nan")))
    path = Run(tmp_path).calibration_path
    path.write_text('{"scale": 2.0, "eps"')
    with pytest.raises(ValueError, match=f"^calibration: {path} is not valid JSON"):
        Run(tmp_path).calibration()
    path.write_text(json.dumps(dict(scale=2.0, trained_eps=1e-5)))
    with pytest.raises(ValueError, match=f"^calibration: {path} is incomplete .*eps"):
        Run(tmp_path).calibration()
    path.write_text(json.dumps(["not", "a", "record"]))
    with pytest.raises(ValueError, match="^calibration: .* is incomplete"):
        Run(tmp_path).calibration()


def test_calibrate_run_names_its_own_arguments(tmp_path):
    """issue 17 item 11: calibrate_run(num_images=0) named max_items (the data loader's argument)."""
    from sosvae_lib.config import TrainConfig
    from sosvae_lib.evaluate import calibrate_run
    from sosvae_lib.train import train

    train(TrainConfig.preset("smoke", max_items=8), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="^num_images:"):
        calibrate_run(tmp_path / "run", num_images=0)
    with pytest.raises(ValueError, match=r"^bounds: .*got \(1, 0\.001\)"):
        calibrate_run(tmp_path / "run", bounds=(1, 1e-3))
    cal = calibrate_run(tmp_path / "run", num_images=4, write=True)
    assert Run(tmp_path / "run").calibration() == cal and cal.num_images == 4
