"""Model, heads, trunk and objectives of SOS-VAE (Langley et al., TMLR 2022): shapes, initialisation and the
loss against dense float64 references."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sosvae_lib.config import TrainConfig
from sosvae_lib.model import VAE, build_model
from sosvae_lib.objectives import BetaELBO, ConstrainedObjective, ascend_multiplier, damped_constraint
from sosvae_lib.trunk import AuthorsDecoderTrunk, BasicBlock, DecoderTrunk, output_paddings, stage_sizes

torch.set_num_threads(1)
HEADS = ("lowrank", "lowrank-diag", "diagonal")

# Parameters at 3×218×178, latent 128, R = 25 (``lowrank``). The authors' network (biomedia-mira/sos-vae,
# src/model/vae.py: width 64, levels 3) has exactly 31,039,054 (31.0 M); the project's ``resnet`` at the old
# paper setting (width 64, levels 4) 28,262,158 (28.3 M).
AUTHORS_PAPER = dict(arch="authors", width=64, levels=3, max_width=512)
RESNET_PAPER = dict(arch="resnet", width=64, levels=4, max_width=512)
PAPER_PARAMS = {"authors": 31_039_054, "resnet": 28_262_158}
# GFLOP (FlopCounterMode: 2 × multiply-accumulates) of encoder + trunk + head for a batch of 4 at 3×218×178
PAPER_GFLOP_BATCH4 = {"authors": 346.8, "resnet": 199.4}


def _paper_model(arch: str, head: str = "lowrank") -> VAE:
    """The full-size network on the meta device: shapes, counts and FLOPs without allocating or computing."""
    with torch.device("meta"):
        return VAE((3, 218, 178), latent=128, head=head, rank=25,
                   **(AUTHORS_PAPER if arch == "authors" else RESNET_PAPER))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    with pytest.raises(ValueError, match="^arch"):
        VAE((1, 8, 8), head="lowrank", rank=2, width=2, levels=2, arch="vgg")
    with pytest.raises(ValueError, match="^image_size"):
        VAE((1, 6, 6), head="lowrank", rank=2, width=2, levels=3, arch="authors")


# -- the two architectures ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("head,extra", [("lowrank", 0), ("lowrank-diag", 195), ("diagonal", -4680)])
@pytest.mark.parametrize("arch", ["authors", "resnet"])
def test_parameter_count_at_the_paper_configuration(arch, head, extra):
    # the heads are shared: a learned diagonal adds a 64→3 conv (195), the pixel-wise head drops P's 64→75 (4,875)
    assert _n_params(_paper_model(arch, head)) == PAPER_PARAMS[arch] + extra


def test_authors_network_block_for_block():
    model = _paper_model("authors")
    enc, trunk = model.encoder, model.trunk
    assert isinstance(trunk, AuthorsDecoderTrunk)
    assert (_n_params(enc), _n_params(trunk), _n_params(model.head)) == (11_566_848, 19_467_136, 5_070)
    # encoder: 64-channel stem, two blocks at full resolution, then (stride-2 block, block) per stage
    assert [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0]) for b in enc.blocks] == [
        (64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
        (512, 512, 1)]
    # decoder: z → 28×23 by a transposed conv, then 512 → 256 → 128 → 64 with two full-resolution blocks
    assert trunk.latent_map.kernel_size == (28, 23) and trunk.latent_map.out_channels == 128
    assert trunk.sizes == [(218, 178), (109, 89), (55, 45), (28, 23)]
    assert output_paddings(trunk.sizes) == [(1, 1), (0, 0), (0, 0)]
    assert [(b.conv1.in_channels, b.conv1.out_channels, isinstance(b.conv1, nn.ConvTranspose2d))
            for b in trunk.blocks] == [
        (512, 512, False), (512, 256, True), (256, 256, False), (256, 128, True), (128, 128, False),
        (128, 64, True), (64, 64, False), (64, 64, False)]
    assert all(isinstance(b, BasicBlock) for b in [*enc.blocks, *trunk.blocks])
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    # shapes of one forward pass, propagated on the meta device (nothing is computed)
    x = torch.empty(4, 3, 218, 178, device="meta")
    mean, std = enc(x)
    assert mean.shape == std.shape == (4, 128)
    h = trunk(mean)
    assert h.shape == (4, 64, 218, 178)
    loc, factor, _ = model.head.distribution_params(h)
    assert loc.shape == (4, 116_412) and factor.shape == (4, 116_412, 25)


@pytest.mark.parametrize("arch", ["authors", "resnet"])
def test_flops_of_one_forward_at_the_paper_configuration(arch):
    model = _paper_model(arch)
    with FlopCounterMode(display=False) as counter:
        mean, _ = model.encoder(torch.empty(4, 3, 218, 178, device="meta"))
        model.head.distribution_params(model.trunk(mean))
    assert round(counter.get_total_flops() / 1e9, 1) == PAPER_GFLOP_BATCH4[arch]


def test_paper_preset_builds_its_architecture():
    config = TrainConfig.preset("paper")
    with torch.device("meta"):
        model = build_model(config, (3, 218, 178))
    assert model.arch == config.arch
    assert _n_params(model) == PAPER_PARAMS[config.arch]


def test_resnet_weights_layout_is_unchanged():
    # existing checkpoints must keep loading: the names of the light ResNet's tensors are fixed
    with torch.device("meta"):
        model = VAE((1, 8, 8), latent=2, head="lowrank", rank=2, width=2, levels=1)
    block = ["norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias", "norm2.weight", "norm2.bias",
             "conv2.weight", "conv2.bias", "skip.weight", "skip.bias"]
    assert list(model.state_dict()) == [
        "encoder.stem.weight", "encoder.stem.bias", *(f"encoder.blocks.0.{k}" for k in block),
        "encoder.out_norm.weight", "encoder.out_norm.bias", "encoder.fc.weight", "encoder.fc.bias",
        "trunk.fc.weight", "trunk.fc.bias", *(f"trunk.blocks.0.{k}" for k in block),
        "trunk.out_norm.weight", "trunk.out_norm.bias",
        "head.mean_conv.weight", "head.mean_conv.bias", "head.factor_conv.weight", "head.factor_conv.bias"]


@pytest.mark.parametrize("hw", [(64, 64), (109, 89), (17, 9)])
@pytest.mark.parametrize("head", HEADS)
def test_authors_forward_and_backward(hw, head):
    torch.manual_seed(0)
    config = TrainConfig(arch="authors", head=head, rank=3, latent=5, width=4, levels=3, max_width=16,
                         image_size=hw)
    model = build_model(config, (3, *hw))
    assert isinstance(model.trunk, AuthorsDecoderTrunk)
    x = torch.rand(2, 3, *hw)
    out = model(x)
    d = 3 * hw[0] * hw[1]
    assert out["obs"].loc.shape == (2, d) and out["obs"].cov_factor.shape == (2, d, 0 if head == "diagonal" else 3)
    assert model.trunk(out["z"]).shape == (2, 4, *hw)
    assert torch.isfinite(out["nll"]).all() and (out["kl"] >= 0).all()
    assert (out["posterior"].scale >= 1e-5 ** 0.5).all()  # the authors' variance floor
    (out["nll"].mean() + out["kl"].mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_authors_batchnorm_in_eval_mode_is_per_image():
    torch.manual_seed(0)
    model = VAE((1, 16, 16), latent=3, head="lowrank", rank=2, width=4, levels=2, arch="authors")
    x = torch.rand(5, 1, 16, 16)
    model(x)  # training mode: batch statistics, and the running statistics move
    assert model.encoder.stem[1].num_batches_tracked.item() == 1
    model.eval()
    with torch.no_grad():
        whole, alone = model.encoder(x)[0][:1], model.encoder(x[:1])[0]
    assert torch.allclose(whole, alone, atol=1e-6)


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
