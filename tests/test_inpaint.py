"""Real inpainting (sosvae_lib.inpaint, issue 19 items 1-2): no hidden pixel ever reaches the model (bitwise, every
mode), the observed-pixel marginal and the conditional on hidden pixels against dense float64 Gaussian algebra, the
z refinement, the training-mean floor and the per-family metrics."""

from __future__ import annotations

import math

import pytest
import torch

from sosvae_lib import inpaint as I
from sosvae_lib import metrics as M
from sosvae_lib.calibration import with_diag_scale
from sosvae_lib.config import TrainConfig
from sosvae_lib.distributions import DiagonalNormal, LowRankNormal
from sosvae_lib.model import build_model

from fake_cuda import fake_cuda, real

torch.set_num_threads(1)
F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------

def _model(head: str = "lowrank", shape=(3, 8, 8), seed: int = 0, rank: int = 3):
    """An untrained smoke-size VAE whose factor and diagonal heads are given visible random weights (at their init P
    is ~1e-5, which would make every conditional trivial)."""
    torch.manual_seed(seed)
    config = TrainConfig.preset("smoke", head=head, rank=rank, latent=4)
    model = build_model(config, shape).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for conv in (model.head.mean_conv, getattr(model.head, "factor_conv", None), model.head.diag_conv):
            if conv is not None:
                conv.weight.copy_(0.3 * torch.randn(conv.weight.shape, generator=gen))
    return model


def _images(b: int = 3, shape=(3, 8, 8), seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, *shape, generator=gen)


def _masks(b: int, shape=(3, 8, 8), seed: int = 2) -> torch.Tensor:
    """bool [B, C, H, W]: a different number of observed positions per image (all channels of a position)."""
    c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(b, 1, h, w, generator=gen) < torch.linspace(0.3, 0.7, b).reshape(b, 1, 1, 1)
    grid[:, :, 0, 0] = True  # at least one observed and one hidden pixel in each image
    grid[:, :, -1, -1] = False
    return grid.expand(b, c, h, w)


def _dense(dist) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ [B, D], Σ [B, D, D]) of an unconditioned distribution, float64."""
    loc = dist.loc.detach().double()
    P = dist.cov_factor.detach().double()
    d = dist.cov_diag.detach().double().expand_as(loc)
    return loc, P @ P.mT + torch.diag_embed(d)


MODES = [dict(rounds=0, steps=0), dict(rounds=2, steps=0), dict(rounds=0, steps=3), dict(rounds=1, steps=2)]


# ----------------------------------------------------------------------------------------------------------
# hidden pixels never reach the model
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["lowrank", "lowrank-diag", "diagonal"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"rounds{m['rounds']}-steps{m['steps']}")
def test_changing_hidden_pixels_changes_nothing(head, mode):
    model = _model(head)
    x = _images()
    m = _masks(3)
    scale = 7.0 if head != "diagonal" else None
    fill = torch.full((3, 8, 8), 0.4)
    other = torch.where(m, x, torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) * 5 - 2)
    nan = torch.where(m, x, torch.full_like(x, float("nan")))
    runs = [I.inpaint(model, xi, m, fill=fill, diag_scale=scale, **mode) for xi in (x, other, nan)]
    draws = [r.sample(2, generator=torch.Generator().manual_seed(3)) for r in runs]
    for r, s in zip(runs[1:], draws[1:]):
        assert torch.equal(r.z, runs[0].z)
        assert torch.equal(r.mean, runs[0].mean)
        assert torch.equal(r.log_joint, runs[0].log_joint)
        assert torch.equal(r.conditional.loc, runs[0].conditional.loc)
        assert torch.equal(r.conditional.cov_diag, runs[0].conditional.cov_diag)
        assert torch.equal(s, draws[0])
    assert torch.isfinite(runs[2].mean).all() and torch.isfinite(draws[2]).all()
    # the prediction keeps the observed pixels exactly
    assert torch.equal(runs[0].mean[m], x[m]) and torch.equal(draws[0][:, m], x[m].expand(2, -1))


def test_the_encoder_only_ever_sees_the_observed_pixels_and_the_fill():
    model = _model()
    x, m = _images(), _masks(3)
    fill = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5))
    seen = []
    encode = model.encode
    model.encode = lambda t: (seen.append(t.detach().clone()), encode(t))[1]
    I.inpaint(model, x, m, fill=fill, rounds=2, steps=2)
    assert len(seen) == 3  # the fill, then one re-fill per round
    assert torch.equal(seen[0], torch.where(m, x, fill.expand_as(x)))
    for t in seen:
        assert torch.equal(t[m], x[m])
    assert not torch.equal(seen[1], seen[0])  # a round re-fills H with the conditional mean


def test_training_mean_and_ppca_baselines_ignore_hidden_pixels():
    x, m = _images(), _masks(3)
    fill = torch.rand(3, 8, 8)
    other = torch.where(m, x, 3.0)
    a, b = I.fill_only(x, m, fill), I.fill_only(other, m, fill)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.mean, torch.where(m, x, fill.expand_as(x)))
    gen = torch.Generator().manual_seed(0)
    ppca = LowRankNormal(torch.rand(192, generator=gen), 0.1 * torch.randn(192, 4, generator=gen),
                         torch.tensor(0.01)).expand((3,))
    r1, r2 = I.inpaint_distribution(ppca, x, m), I.inpaint_distribution(ppca, other, m)
    assert torch.equal(r1.mean, r2.mean) and torch.equal(r1.conditional.cov_factor, r2.conditional.cov_factor)


# ----------------------------------------------------------------------------------------------------------
# dense float64 references
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["scalar", "per-pixel", "diagonal"])
def test_observed_marginal_equals_dense_float64(kind, dtype):
    gen = torch.Generator().manual_seed(0)
    b, d, r = 4, 30, 3
    loc = torch.rand(b, d, generator=gen, dtype=F64)
    P = 0.3 * torch.randn(b, d, r, generator=gen, dtype=F64)
    diag = (torch.tensor(1e-3, dtype=F64) if kind == "scalar"
            else 1e-3 + 0.05 * torch.rand(b, d, generator=gen, dtype=F64))
    if kind == "diagonal":
        P = P[..., :0]
        dist = DiagonalNormal(loc.to(dtype), diag.to(dtype))
    else:
        dist = LowRankNormal(loc.to(dtype), P.to(dtype), diag.to(dtype))
    x = loc + (P @ torch.randn(b, r if kind != "diagonal" else 0, 1, generator=gen, dtype=F64)).squeeze(-1) \
        + 0.03 * torch.randn(b, d, generator=gen, dtype=F64)
    obs = torch.rand(b, d, generator=gen) < torch.tensor([0.2, 0.5, 0.8, 1.0]).unsqueeze(-1)
    obs[:, 0] = True
    got = I.observed_marginal(dist, obs).log_prob(x.to(dtype))
    cov = P @ P.mT + torch.diag_embed(diag.expand(b, d))
    for i in range(b):
        o = obs[i]
        ref = torch.distributions.MultivariateNormal(loc[i, o], cov[i][o][:, o]).log_prob(x[i, o])
        tol = 1e-9 if dtype == F64 else 2e-3
        assert float(got[i]) == pytest.approx(float(ref), abs=tol * max(1.0, abs(float(ref))))
    # hidden entries of the value are never read
    assert torch.equal(I.observed_marginal(dist, obs).log_prob(torch.where(obs, x, float("nan")).to(dtype)), got)


@pytest.mark.parametrize("head,scale", [("lowrank", None), ("lowrank", 300.0), ("lowrank-diag", 2.0),
                                        ("diagonal", None)])
def test_conditional_on_hidden_pixels_equals_dense_float64(head, scale):
    """For the z the inpainting returns, mean and covariance of x_H | x_O and the NLL of the true hidden pixels
    equal the textbook Gaussian conditioning of the dense float64 Σ = P Pᵀ + diag d (times the calibrated scale)."""
    model = _model(head)
    x, m = _images(), _masks(3)
    res = I.inpaint(model, x, m, rounds=1, diag_scale=scale)
    dist = with_diag_scale(model, scale).decode(res.z)
    loc, cov = _dense(dist)
    xf, mf = x.reshape(3, -1).double(), m.reshape(3, -1)
    cond_cov = res.conditional.covariance_matrix.double()
    score = res.score(x)
    for i in range(3):
        o, h = mf[i], ~mf[i]
        S_oo, S_ho, S_hh = cov[i][o][:, o], cov[i][h][:, o], cov[i][h][:, h]
        gain = S_ho @ torch.linalg.inv(S_oo)
        mean_h = loc[i, h] + gain @ (xf[i, o] - loc[i, o])
        cov_h = S_hh - gain @ S_ho.T
        assert torch.allclose(res.mean.reshape(3, -1)[i, h].double(), mean_h, rtol=1e-4, atol=1e-4)
        # float32 Σ_HH ≈ 3 and a conditional ≈ 1e-5 (trained ε): the factored form keeps ~1e-4 of it
        assert torch.allclose(cond_cov[i][h][:, h], cov_h, rtol=0, atol=1e-4 * float(cov_h.diagonal().max()))
        ref = -torch.distributions.MultivariateNormal(mean_h, cov_h).log_prob(xf[i, h])
        assert float(score.nll[i]) == pytest.approx(float(ref), rel=1e-4, abs=1e-2)
        assert float(score.sq_err[i]) == pytest.approx(float(((xf[i, h] - mean_h) ** 2).sum()), rel=1e-4)
        assert int(score.num_hidden[i]) == int(h.sum())


def test_log_joint_and_refinement():
    """log_joint = log p(x_O | z) + log N(z; 0, I) from the dense marginal; refinement never lowers it and is
    per image (the batch does not change an image's answer)."""
    model = _model("lowrank")
    x, m = _images(), _masks(3)
    base = I.inpaint(model, x, m, rounds=0, diag_scale=50.0)
    loc, cov = _dense(with_diag_scale(model, 50.0).decode(base.z))
    mf, xf = m.reshape(3, -1), x.reshape(3, -1).double()
    for i in range(3):
        o = mf[i]
        ref = torch.distributions.MultivariateNormal(loc[i, o], cov[i][o][:, o]).log_prob(xf[i, o])
        ref = ref - 0.5 * (base.z[i].double().square().sum() + base.z.shape[1] * math.log(2 * math.pi))
        assert float(base.log_joint[i]) == pytest.approx(float(ref), rel=1e-5)
    fit = I.inpaint(model, x, m, rounds=0, steps=10, lr=0.05, diag_scale=50.0)
    assert (fit.log_joint >= base.log_joint).all() and (fit.log_joint > base.log_joint + 1e-3).any()
    one = I.inpaint(model, x[1:2], m[1:2], rounds=0, steps=10, lr=0.05, diag_scale=50.0)
    assert torch.allclose(one.z, fit.z[1:2], atol=1e-5) and torch.allclose(one.mean, fit.mean[1:2], atol=1e-5)
    # a second call gives the same answer bitwise (deterministic)
    assert torch.equal(I.inpaint(model, x, m, rounds=0, steps=10, lr=0.05, diag_scale=50.0).z, fit.z)


def test_samples_follow_the_conditional():
    model = _model("lowrank")
    x, m = _images(1), _masks(1)
    res = I.inpaint(model, x, m, diag_scale=100.0)
    draws = res.sample(4000, generator=torch.Generator().manual_seed(0)).reshape(4000, -1).double()
    h = ~m.reshape(-1)
    cov = res.conditional.covariance_matrix[0].double()
    sd = float(cov.diagonal().max()) ** 0.5
    assert torch.allclose(draws.mean(0)[h], res.mean.reshape(-1)[h].double(), atol=4 * sd / math.sqrt(4000))
    emp = torch.cov(draws[:, h].T)
    assert float((emp - cov[h][:, h]).abs().max()) < 0.1 * float(cov.diagonal().max())


# ----------------------------------------------------------------------------------------------------------
# flattened inputs, devices, errors
# ----------------------------------------------------------------------------------------------------------

def test_flattened_images_masks_and_fill_give_the_same_answer():
    model = _model()
    x, m = _images(), _masks(3)
    fill = torch.rand(3, 8, 8)
    a = I.inpaint(model, x, m, fill=fill, rounds=1)
    b = I.inpaint(model, x.reshape(3, -1), m.reshape(3, -1), fill=fill.reshape(-1).double(), rounds=1)
    c = I.inpaint(model, x, m.reshape(3, -1).float(), fill=fill.reshape(-1), rounds=1)  # a 0/1 float mask
    assert a.mean.shape == x.shape and b.mean.shape == (3, 192)
    assert torch.equal(a.mean.reshape(3, -1), b.mean) and torch.equal(a.mean, c.mean)
    # one mask for the whole batch broadcasts
    top = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    top[..., :4, :] = True
    d = I.inpaint(model, x, top, fill=fill)
    assert int(d.score(x).num_hidden[0]) == 3 * 32


def test_default_fill_is_the_observed_mean_per_channel():
    x, m = _images(), _masks(3)
    filled = I.fill_hidden(x, m)
    for i in range(3):
        for c in range(3):
            expected = x[i, c][m[i, c]].mean()
            assert torch.allclose(filled[i, c][~m[i, c]], expected.expand(int((~m[i, c]).sum())))


def test_runs_on_the_device_of_the_model():
    model = _model()
    x, m = _images(), _masks(3)
    fill = torch.rand(192, dtype=F64)  # a CPU float64 training mean, as evaluate has it
    ref = I.inpaint(model, x, m, fill=fill, rounds=1, diag_scale=10.0)
    ref_draw = ref.sample(2, generator=torch.Generator().manual_seed(0))
    with fake_cuda():
        model_c = model.to("cuda")
        res = I.inpaint(model_c, x.to("cuda"), m, fill=fill, rounds=1, diag_scale=10.0)  # CPU mask and fill
        assert res.mean.device.type == "cuda" and res.z.device.type == "cuda"
        draw = res.sample(2, generator=torch.Generator(device="cuda").manual_seed(0))
        score = res.score(x.to("cuda"))
        base = I.fill_only(x.to("cuda"), m, fill)
        scores = I.RealInpaintScores(rounds=1, families=("top_half",))
        scores.add(model_c, x.to("cuda"), dict(top_half=m.reshape(3, -1)), fill, diag_scale=10.0)
        out = scores.result()
    assert torch.allclose(real(res.mean), ref.mean, atol=1e-6)
    assert torch.allclose(real(score.nll), ref.score(x).nll, rtol=1e-5)
    assert real(draw).shape == ref_draw.shape and real(base.mean).shape == x.shape
    assert math.isfinite(out["real_inpaint_rmse_top_half"])


def test_bad_arguments_are_named():
    model = _model()
    x, m = _images(), _masks(3)
    with pytest.raises(ValueError, match="observed"):
        I.inpaint(model, x, m[:, :, :4])
    with pytest.raises(ValueError, match="observed"):
        I.inpaint(model, x, m.float() * 0.5)
    with pytest.raises(TypeError, match="observed"):
        I.inpaint(model, x, [[True]])
    with pytest.raises(ValueError, match="fill"):
        I.inpaint(model, x, m, fill=torch.zeros(5))
    with pytest.raises(ValueError, match="fill"):
        I.inpaint(model, x, m, fill=torch.full((3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="x"):
        I.inpaint(model, torch.where(m, float("inf"), x), m)
    with pytest.raises(ValueError, match="x"):
        I.inpaint(model, x[0], m[0])
    with pytest.raises(ValueError, match="x: images of shape"):
        I.inpaint(model, x[:, :2], m[:, :2])
    with pytest.raises(ValueError, match="x: 100 values"):
        I.inpaint(model, x.reshape(3, -1)[:, :100], m.reshape(3, -1)[:, :100])
    for name, bad in (("rounds", -1), ("steps", 1.5), ("lr", 0.0)):
        with pytest.raises(ValueError, match=name):
            I.inpaint(model, x, m, **{name: bad})
    with pytest.raises(ValueError, match="diag_scale"):
        I.inpaint(_model("diagonal"), x, m, diag_scale=2.0)
    with pytest.raises(TypeError, match="model"):
        I.inpaint(object(), x, m)
    with pytest.raises(ValueError, match="num_samples"):
        I.inpaint(model, x, m).sample(0)


# ----------------------------------------------------------------------------------------------------------
# the per-family metrics
# ----------------------------------------------------------------------------------------------------------

def test_real_inpaint_scores_are_the_pooled_sums():
    model = _model()
    x, shape = _images(5), (3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    corners = M.random_patch_corners(5, shape, 3, generator=gen)
    masks = dict(random50=M.random_pixel_masks(5, shape, 0.5, generator=gen),
                 patch10=M.patch_masks(shape, corners[0], corners[1], 3),
                 patch10_maxvar=M.patch_masks(shape, corners[1], corners[0], 3),
                 top_half=M.half_masks(5, shape, "top"), left_half=M.half_masks(5, shape, "left"))
    fill = torch.rand(192, dtype=F64)
    scores = I.RealInpaintScores(rounds=1, steps=0)
    for sl in (slice(0, 2), slice(2, 5)):  # two batches pool into one number per family
        scores.add(model, x[sl], {k: v[sl] for k, v in masks.items()}, fill, diag_scale=20.0)
    out = scores.result()
    assert set(out) == {f"real_inpaint_{what}_{f}{tail}" for f in I.REAL_INPAINT_FAMILIES
                        for what, tail in (("rmse", ""), ("nll_bpd", ""), ("rmse", "_train_mean"))}
    for family in I.REAL_INPAINT_FAMILIES:
        res = I.inpaint(model, x, masks[family], fill=fill, rounds=1, diag_scale=20.0)
        s = res.score(x)
        hidden = float(s.num_hidden.sum())
        assert out[f"real_inpaint_rmse_{family}"] == pytest.approx(math.sqrt(float(s.sq_err.sum()) / hidden), rel=1e-5)
        assert out[f"real_inpaint_nll_bpd_{family}"] == pytest.approx(
            float(M.bits_per_dim(float(s.nll.sum()), hidden)), rel=1e-5)
        mf = masks[family].reshape(5, 3, 8, 8)
        err = ((x.double() - fill.reshape(3, 8, 8)) ** 2 * (~mf)).sum()
        assert out[f"real_inpaint_rmse_{family}_train_mean"] == pytest.approx(math.sqrt(float(err) / hidden), rel=1e-6)
    # a distribution without a latent (the PPCA rows) is scored by conditioning alone
    ppca = LowRankNormal(fill.float(), 0.1 * torch.randn(192, 2, generator=gen), torch.tensor(0.02))
    base = I.RealInpaintScores()
    base.add(ppca.expand((5,)), x, masks, fill)
    ref = M.inpaint(ppca.expand((5,)), x.reshape(5, -1), masks["top_half"])
    assert base.result()["real_inpaint_rmse_top_half"] == pytest.approx(
        math.sqrt(float(ref.sq_err_cond.sum()) / float(ref.num_hidden.sum())), rel=1e-5)
    with pytest.raises(ValueError, match="masks"):
        I.RealInpaintScores().add(model, x, dict(random50=masks["random50"]), fill)
    with pytest.raises(ValueError, match="no images"):
        I.RealInpaintScores().result()


# ----------------------------------------------------------------------------------------------------------
# the figure's panel (inpaint_panel, figure_masks)
# ----------------------------------------------------------------------------------------------------------

def test_figure_masks_observe_the_top_half_the_left_half_and_a_central_square():
    shape = (3, 8, 10)
    m = {k: v.reshape(shape) for k, v in I.figure_masks(shape, 4).items()}
    assert list(m) == ["top_half", "left_half", "patch"]
    assert m["top_half"][:, :4].all() and not m["top_half"][:, 4:].any()
    assert m["left_half"][:, :, :5].all() and not m["left_half"][:, :, 5:].any()
    assert m["patch"].sum() == 3 * 16 and m["patch"][:, 2:6, 3:7].all()
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="patch"):
            I.figure_masks(shape, bad)


def test_the_panel_is_inpaint_of_each_method_and_never_sees_the_hidden_pixels():
    shape = (3, 8, 8)
    models = {"diagonal": _model("diagonal", shape), "lowrank": _model("lowrank", shape, seed=1)}
    x = _images(1, shape)[0]
    fill = _images(1, shape, seed=5)[0]
    ppca = LowRankNormal(torch.rand(192, dtype=F64), 0.1 * torch.randn(192, 3, dtype=F64), torch.full((192,), 0.05, dtype=F64))
    masks = I.figure_masks(shape, 4)
    panel = I.inpaint_panel(x, masks, fill, models, pca=ppca, diag_scales={"lowrank": 2.0}, num_samples=3, seed=7)
    assert list(panel) == list(masks)
    for name, row in panel.items():
        observed = masks[name]
        assert list(row.means) == ["PPCA", "diagonal", "lowrank", "train mean"]
        want = I.inpaint(models["lowrank"], x[None], observed[None], fill=fill, diag_scale=2.0)
        assert torch.equal(row.means["lowrank"], want.mean[0])
        assert torch.equal(row.means["diagonal"],
                           I.inpaint(models["diagonal"], x[None], observed[None], fill=fill).mean[0])
        # PPCA against the dense float64 conditional mean: μ_H + Σ_HO Σ_OO⁻¹ (x_O − μ_O)
        cov = ppca.cov_factor @ ppca.cov_factor.T + torch.diag(ppca.cov_diag)
        o, h = observed, ~observed
        xf = x.reshape(-1).double()
        dense = ppca.loc[h] + cov[h][:, o] @ torch.linalg.solve(cov[o][:, o], xf[o] - ppca.loc[o])
        torch.testing.assert_close(row.means["PPCA"].reshape(-1)[h].double(), dense, atol=1e-5, rtol=0)
        assert torch.equal(row.means["train mean"].reshape(-1)[h], fill.reshape(-1)[h])
        # completions keep the observed pixels exactly and come from the lowrank model's conditional
        assert row.samples.shape == (3, *shape) and row.sampled == "lowrank"
        assert torch.equal(row.samples.reshape(3, -1)[:, o], xf[o].float().expand(3, -1))
        torch.testing.assert_close(row.samples, want.sample(3, torch.Generator().manual_seed(7))[:, 0])
        for label, mean in row.means.items():
            err = (mean.reshape(-1)[h].double() - xf[h]).square().mean().sqrt()
            assert row.rmse[label] == pytest.approx(float(err), rel=1e-6)
    # another image with the same observed pixels: the same predictions (only the RMSEs change)
    for name, observed in masks.items():
        y = torch.where(observed.reshape(shape), x, torch.rand(shape))
        again = I.inpaint_panel(y, {name: observed}, fill, models, pca=ppca, diag_scales={"lowrank": 2.0},
                                num_samples=3, seed=7)[name]
        for label in panel[name].means:
            assert torch.equal(again.means[label], panel[name].means[label]), (name, label)
        assert torch.equal(again.samples, panel[name].samples)


def test_the_panel_names_its_bad_arguments():
    shape = (3, 8, 8)
    model, x, fill = _model("lowrank", shape), _images(1, shape)[0], _images(1, shape)[0]
    masks = I.figure_masks(shape, 4)
    with pytest.raises(ValueError, match="x:"):
        I.inpaint_panel(x[None], masks, fill, {"lowrank": model})
    with pytest.raises(ValueError, match="masks"):
        I.inpaint_panel(x, {}, fill, {"lowrank": model})
    with pytest.raises(ValueError, match="models"):
        I.inpaint_panel(x, masks, fill, {})
    with pytest.raises(ValueError, match="sampled"):
        I.inpaint_panel(x, masks, fill, {"lowrank": model}, sampled="other")
    with pytest.raises(ValueError, match="diag_scales"):
        I.inpaint_panel(x, masks, fill, {"lowrank": model}, diag_scales={"diagonal": 2.0})
    with pytest.raises(ValueError, match="num_samples"):
        I.inpaint_panel(x, masks, fill, {"lowrank": model}, num_samples=-1)
