"""Model, heads, trunk and objectives of SOS-VAE (Langley et al., TMLR 2022): shapes, initialisation and the
loss against dense float64 references."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from sosvae_lib.model import VAE
from sosvae_lib.objectives import BetaELBO, ConstrainedObjective, ascend_multiplier, damped_constraint
from sosvae_lib.trunk import DecoderTrunk, stage_sizes

torch.set_num_threads(1)
HEADS = ("lowrank", "lowrank-diag", "diagonal")


@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (64, 64), (218, 178), (17, 9)])
@pytest.mark.parametrize("head", HEADS)
def test_shapes_at_every_size(hw, head):
    torch.manual_seed(0)
    c = 3 if hw == (218, 178) else 1
    model = VAE((c, *hw), latent=5, head=head, rank=3, width=4, levels=3)
    x = torch.rand(2, c, *hw)
    out = model(x)
    d = c * hw[0] * hw[1]
    assert out["nll"].shape == (2,) and out["kl"].shape == (2,) and out["z"].shape == (2, 5)
    assert out["posterior"].loc.shape == (2, 5)
    obs = out["obs"]
    assert obs.loc.shape == (2, d)
    assert obs.cov_factor.shape == (2, d, 0 if head == "diagonal" else 3)
    assert model.rank == (0 if head == "diagonal" else 3)
    assert torch.isfinite(out["nll"]).all() and (out["kl"] >= 0).all()
    assert model.trunk(out["z"]).shape == (2, 4, *hw)
    assert model.decode(torch.randn(4, 5)).loc.shape == (4, d)


def test_stage_sizes_round_up_and_trunk_retraces_them():
    assert stage_sizes(218, 178, 4) == [(218, 178), (109, 89), (55, 45), (28, 23), (14, 12)]
    trunk = DecoderTrunk((218, 178), latent=3, width=2, levels=4, max_width=8)
    assert trunk.widths == [2, 4, 8, 8, 8]
    assert trunk(torch.randn(1, 3)).shape == (1, 2, 218, 178)


def test_paper_initialisation():
    torch.manual_seed(0)
    model = VAE((1, 16, 16), latent=4, head="lowrank", rank=3, width=4, levels=2)
    obs = model.decode(torch.randn(3, 4))
    assert torch.allclose(obs.loc, torch.full_like(obs.loc, 0.5), atol=1e-3)
    assert obs.cov_factor.abs().max() < 1e-3
    assert torch.allclose(obs.cov_diag, torch.full_like(obs.loc, 1e-5))
    assert model.head.factor_conv.weight.std().item() == pytest.approx(1e-5, rel=0.3)
    diag = VAE((1, 16, 16), latent=4, head="diagonal", width=4, levels=2, init_var=0.02).decode(torch.randn(2, 4))
    assert torch.allclose(diag.cov_diag, torch.full_like(diag.loc, 0.02), rtol=1e-3)


def _dense_reference(obs, x):
    loc = obs.loc.double()
    d = obs.cov_diag.double().expand_as(loc)
    p = obs.cov_factor.double()
    cov = p @ p.transpose(-1, -2) + torch.diag_embed(d)
    return -MultivariateNormal(loc, covariance_matrix=cov).log_prob(x.double())


@pytest.mark.parametrize("head", HEADS)
def test_loss_equals_log_prob_of_the_head_distribution(head):
    torch.manual_seed(1)
    model = VAE((2, 6, 5), latent=3, head=head, rank=4, width=4, levels=2, eps=1e-3)
    # give P and μ real structure (the paper's init makes them nearly constant)
    with torch.no_grad():
        model.head.mean_conv.weight.normal_(0, 0.3)
        if head != "diagonal":
            model.head.factor_conv.weight.normal_(0, 0.3)
        if hasattr(model.head, "diag_conv") and model.head.diag_conv is not None:
            model.head.diag_conv.weight.normal_(0, 0.3)
    x = torch.rand(3, 2, 6, 5)
    torch.manual_seed(5)
    out = model(x)
    flat = x.reshape(3, -1)
    ref = _dense_reference(out["obs"], flat)
    assert torch.allclose(out["nll"].double(), ref, rtol=1e-4, atol=1e-3)
    # the KL term is the analytic KL(N(m, s²) ‖ N(0, 1)) summed over latents
    q = out["posterior"]
    kl = (0.5 * (q.loc ** 2 + q.scale ** 2 - 1) - q.scale.log()).sum(-1)
    assert torch.allclose(out["kl"], kl, atol=1e-5)
    # and z is the reparameterised sample of q
    torch.manual_seed(5)
    eps = torch.randn(3, 3)
    assert torch.allclose(out["z"], q.loc + q.scale * eps, atol=1e-6)


def test_diagonal_loss_is_sum_of_pixel_normals():
    torch.manual_seed(2)
    model = VAE((1, 8, 8), latent=3, head="diagonal", width=4, levels=2)
    x = torch.rand(4, 1, 8, 8)
    out = model(x)
    obs = out["obs"]
    ref = -Normal(obs.loc.double(), obs.cov_diag.double().sqrt()).log_prob(x.reshape(4, -1).double()).sum(-1)
    assert torch.allclose(out["nll"].double(), ref, rtol=1e-6)


def test_fixed_diagonal_nll_is_weighted_squared_error_at_init():
    torch.manual_seed(3)
    model = VAE((1, 8, 8), latent=3, head="lowrank", rank=2, width=4, levels=2)
    x = torch.rand(2, 1, 8, 8)
    out = model(x)
    r = x.reshape(2, -1) - out["obs"].loc
    ref = 0.5 * (r ** 2).sum(-1) / 1e-5 + 0.5 * 64 * math.log(2 * math.pi * 1e-5)
    assert torch.allclose(out["nll"], ref, rtol=2e-3)


def test_bad_model_arguments_name_the_field():
    with pytest.raises(ValueError, match="^rank"):
        VAE((1, 8, 8), head="lowrank", rank=64, width=2, levels=2)
    with pytest.raises(ValueError, match="^image_size"):
        VAE((1, 6, 6), head="lowrank", rank=2, width=2, levels=3)
    with pytest.raises(ValueError, match="^head"):
        VAE((1, 8, 8), head="full", rank=2, width=2, levels=2)


def test_damped_constraint_value_and_gradient():
    kl = torch.tensor(12.0, requires_grad=True)
    term = damped_constraint(kl, 10.0, multiplier=3.0, damping=10.0)
    term.backward()
    assert term.item() == pytest.approx((3 + 10 * 2) * 2)
    assert kl.grad.item() == pytest.approx(3 + 10 * 2)  # the damping factor is a constant (stop-gradient)
    assert ascend_multiplier(1.0, -5.0, 1.0) == 0.0 and ascend_multiplier(1.0, 2.5, 2.0) == 6.0


def test_constrained_objective_batch_sums_and_update():
    obj = ConstrainedObjective(target_kl=4.0, damping=10.0, lambda_lr=1.0, lambda_init=2.0, entropy_target=-1.0)
    nll, kl, ent = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0]), torch.tensor([0.0, 1.0])
    loss = obj.loss(nll, kl, ent)
    # NLL 3; KL violation g = 11 - 8 = 3 → (2 + 30)·3; entropy g = 1 + 2 = 3 → (0 + 30)·3
    assert loss.item() == pytest.approx(3 + 96 + 90)
    obj.update(obj.violations(kl, ent))
    assert obj.lam == 5.0 and obj.lam_entropy == 3.0
    assert BetaELBO(0.5).loss(nll, kl).item() == pytest.approx(3 + 5.5)
