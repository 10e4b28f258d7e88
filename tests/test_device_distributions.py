"""CUDA semantics of `sosvae_lib.distributions` proved on the CPU, and its shield against a caller's autocast.

Every public computation of LowRankNormal and DiagonalNormal (log_prob, entropy, variance, covariance rows,
from_noise, rsample/sample with a device generator, condition and everything on the conditional) runs on tensors
that claim ``cuda`` (tests/fake_cuda.py), with the diagonal given as a 0-dim CPU tensor (the README's
``torch.tensor(1e-5)``), a device scalar, a float and a learned [B, D] tensor: a CPU tensor meeting a CUDA one
raises, and the values must equal the CPU run. Under an outer bf16 autocast (CPU, and CUDA on claimed tensors) the
likelihood, the conditional and the samples must stay float32 and equal to the run without autocast.
"""

from __future__ import annotations

import pytest
import torch

from fake_cuda import fake_cuda, real
from sosvae_lib.distributions import DiagonalNormal, LowRankNormal

F32 = torch.float32


def _case(b=2, d=48, r=3, seed=0, eps=1e-3):
    g = torch.Generator().manual_seed(seed)
    loc = torch.rand(b, d, generator=g)
    factor = 0.1 * torch.randn(b, d, r, generator=g)
    learned = eps + 0.05 * torch.rand(b, d, generator=g)
    x = loc + (factor @ torch.randn(b, r, 1, generator=g)).squeeze(-1) + 0.05 * torch.randn(b, d, generator=g)
    mask = torch.rand(b, d, generator=g) < 0.4
    mask2 = torch.rand(b, d, generator=g) < 0.2
    return loc, factor, learned, x, mask, mask2


def _diag(kind: str, learned: torch.Tensor, eps: float, device: str):
    if kind == "cpu-scalar":  # stays on the CPU in both runs, as in the README
        return torch.tensor(eps)
    if kind == "device-scalar":
        return torch.tensor(eps).to(device)
    if kind == "float":
        return eps
    return learned.to(device)


def _everything(dist, x, mask, mask2, device: str) -> dict[str, torch.Tensor]:
    """Every public number of ``dist`` and of its conditionals, noises drawn by a generator on ``device``."""
    gen = torch.Generator(device=device).manual_seed(5)
    bs, D, R = tuple(dist.batch_shape), dist.D, dist.rank
    eps_r = torch.randn(4, *bs, R, generator=gen, device=device)
    eps_d = torch.randn(4, *bs, D, generator=gen, device=device)
    torch.manual_seed(0)  # rsample without a generator: torch's global one (the CPU's under fake_cuda)
    out = dict(log_prob=dist.log_prob(x), entropy=dist.entropy(), variance=dist.variance, stddev=dist.stddev,
               row=dist.covariance_row(7), from_noise=dist.from_noise(eps_r, eps_d), rsample=dist.rsample((3,)))
    cond = dist.condition(mask, x)
    out.update(cond_mean=cond.mean, cond_log_prob=cond.log_prob(x + 0.01), cond_entropy=cond.entropy(),
               cond_variance=cond.variance, cond_row=cond.covariance_row(7), cond_noise=cond.from_noise(eps_r, eps_d),
               cond_sample=cond.sample((2,)), cond_diag=cond.cov_diag)
    cond2 = cond.condition(mask2, x)  # a conditional of a conditional
    out.update(cond2_mean=cond2.mean, cond2_log_prob=cond2.log_prob(x - 0.01), cond2_variance=cond2.variance)
    return out


def _on(device: str, *tensors):
    return [t.to(device) for t in tensors]


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert value.device.type == "cuda", f"{name} is on {value.device}"
        ref = expected[name]
        assert value.dtype == ref.dtype and value.shape == ref.shape, name
        torch.testing.assert_close(real(value), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["cpu-scalar", "device-scalar", "float", "learned"])
@pytest.mark.parametrize("family", ["lowrank", "diagonal"])
def test_every_computation_runs_on_cuda_tensors_and_equals_the_cpu_run(kind, family):
    loc, factor, learned, x, mask, mask2 = _case()

    def build(device):
        lc, pc = _on(device, loc, factor)
        d = _diag(kind, learned, 1e-3, device)
        return LowRankNormal(lc, pc, d) if family == "lowrank" else DiagonalNormal(lc, d)

    expected = _everything(build("cpu"), x, mask, mask2, "cpu")
    with fake_cuda() as mode:
        xc, mc, m2c = _on("cuda", x, mask, mask2)
        moved = len(mode.events)
        got = _everything(build("cuda"), xc, mc, m2c, "cuda")
    _assert_same(got, expected)
    # nothing is made on the CPU and copied over (a float ε is filled on the device, a CPU scalar lifted)
    copies = [e for e in mode.events[moved:] if e[0] == "h2d"]
    assert len(copies) == 2 + (kind in ("device-scalar", "learned"))  # build's own: loc, factor, the diagonal


@pytest.mark.parametrize("family", ["lowrank", "diagonal"])
def test_sampling_with_a_device_generator_on_cuda_tensors_equals_the_cpu_run(family):
    loc, factor, _, x, mask, _ = _case()

    def draws(device):
        d = torch.tensor(1e-3)
        dist = LowRankNormal(loc.to(device), factor.to(device), d) if family == "lowrank" else \
            DiagonalNormal(loc.to(device), d)
        gen = torch.Generator(device=device).manual_seed(2)
        cond = dist.condition(mask.to(device), x.to(device))
        return [dist.rsample((3,), generator=gen), dist.sample((), generator=gen), cond.sample((2,), generator=gen)]

    expected = draws("cpu")
    with fake_cuda():
        got = draws("cuda")
    for g, e in zip(got, expected):
        assert g.device.type == "cuda"
        torch.testing.assert_close(real(g), e, rtol=1e-5, atol=1e-6)


def test_a_cpu_generator_for_cuda_parameters_is_refused_naming_it():
    loc, factor, *_ = _case()
    with fake_cuda():
        dist = LowRankNormal(loc.cuda(), factor.cuda(), torch.tensor(1e-3))
        with pytest.raises(ValueError, match="generator"):
            dist.rsample((2,), generator=torch.Generator().manual_seed(0))
        with pytest.raises(TypeError, match="generator"):
            dist.sample((2,), generator=3)


def test_parameters_on_different_devices_are_refused_naming_them():
    loc, factor, learned, *_ = _case()
    with fake_cuda():
        with pytest.raises(ValueError, match="cov_factor"):
            LowRankNormal(loc.cuda(), factor, torch.tensor(1e-3))
        with pytest.raises(ValueError, match="cov_diag"):
            LowRankNormal(loc.cuda(), factor.cuda(), learned)
        with pytest.raises(ValueError, match="cov_diag"):
            DiagonalNormal(loc.cuda(), learned)


def test_sampling_with_a_generator_is_reproducible_and_matches_from_noise():
    loc, factor, learned, *_ = _case()
    dist = LowRankNormal(loc, factor, learned)
    a = dist.rsample((3,), generator=torch.Generator().manual_seed(1))
    b = dist.sample((3,), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    eps_d = torch.randn(3, 2, 48, generator=g)
    eps_r = torch.randn(3, 2, 3, generator=g)
    assert torch.equal(a, b) and torch.equal(a, dist.from_noise(eps_r, eps_d))


# ---------------------------------------------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------------------------------------------

def _realistic(learned: bool):
    """D = 3·32·32, R = 25, d = 1e-5 (or a learned diagonal near it): the sizes at which bf16 moves the NLL."""
    g = torch.Generator().manual_seed(0)
    b, d, r = 2, 3 * 32 * 32, 25
    loc = torch.rand(b, d, generator=g)
    factor = 0.05 * torch.randn(b, d, r, generator=g)
    x = loc + (factor @ torch.randn(b, r, 1, generator=g)).squeeze(-1) + 3e-3 * torch.randn(b, d, generator=g)
    diag = 1e-5 + 1e-5 * torch.rand(b, d, generator=g) if learned else torch.tensor(1e-5)
    mask = torch.rand(b, d, generator=g) < 0.5
    noise = (torch.randn(4, b, r, generator=g), torch.randn(4, b, d, generator=g))
    return loc, factor, diag, x, mask, noise


def _shielded_numbers(loc, factor, diag, x, mask, noise):
    p = factor.clone().requires_grad_(True)
    dist = LowRankNormal(loc, p, diag)
    lp = dist.log_prob(x)
    (grad,) = torch.autograd.grad(lp.sum(), p)  # the backward runs inside the caller's region too
    cond = dist.condition(mask, x)
    return dict(log_prob=lp.detach(), grad=grad, entropy=LowRankNormal(loc, factor, diag).entropy(),
                sample=dist.from_noise(*noise).detach(), row=dist.covariance_row(100).detach(),
                cond_mean=cond.mean.detach(), cond_log_prob=cond.log_prob(x + 1e-3).detach(),
                cond_entropy=cond.entropy().detach(), cond_sample=cond.from_noise(*noise).detach())


def _check_autocast(got: dict, expected: dict) -> None:
    for name in ("log_prob", "entropy", "cond_log_prob", "cond_entropy"):  # nats
        assert got[name].dtype == F32, name
        err = float((real(got[name]).double() - expected[name].double()).abs().max())
        assert err <= 1e-3, f"{name} moved by {err:.3g} nats under autocast"
    for name in ("grad", "sample", "row", "cond_mean", "cond_sample"):
        assert got[name].dtype == F32, name
        torch.testing.assert_close(real(got[name]), expected[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("learned", [False, True])
def test_an_outer_cpu_bf16_autocast_changes_nothing(learned):
    args = _realistic(learned)
    expected = _shielded_numbers(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _shielded_numbers(*args)
    _check_autocast(got, expected)


@pytest.mark.parametrize("learned", [False, True])
def test_an_outer_cuda_bf16_autocast_changes_nothing_on_cuda_tensors(learned):
    loc, factor, diag, x, mask, noise = _realistic(learned)
    dist = LowRankNormal(loc, factor, diag)
    cond = dist.condition(mask, x)
    expected = dict(log_prob=dist.log_prob(x), entropy=dist.entropy(), cond_mean=cond.mean,
                    cond_log_prob=cond.log_prob(x + 1e-3), cond_entropy=cond.entropy(),
                    sample=dist.from_noise(*noise), cond_sample=cond.from_noise(*noise), row=dist.covariance_row(100))
    with fake_cuda():  # backward cannot run on claimed-CUDA tensors: forward only
        loc_c, p_c, x_c, mask_c = _on("cuda", loc, factor, x, mask)
        diag_c = diag if diag.dim() == 0 else diag.cuda()  # the 0-dim one stays on the CPU
        noise_c = _on("cuda", *noise)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.bmm(p_c.mT, p_c).dtype == torch.bfloat16  # the region is active on these tensors
            dist = LowRankNormal(loc_c, p_c, diag_c)
            cond = dist.condition(mask_c, x_c)
            got = dict(log_prob=dist.log_prob(x_c), entropy=dist.entropy(), cond_mean=cond.mean,
                       cond_log_prob=cond.log_prob(x_c + 1e-3), cond_entropy=cond.entropy(),
                       sample=dist.from_noise(*noise_c), cond_sample=cond.from_noise(*noise_c),
                       row=dist.covariance_row(100))
    for name in ("log_prob", "entropy", "cond_log_prob", "cond_entropy"):
        assert got[name].dtype == F32 and got[name].device.type == "cuda", name
        err = float((real(got[name]).double() - expected[name].double()).abs().max())
        assert err <= 1e-3, f"{name} moved by {err:.3g} nats under autocast"
    for name in ("cond_mean", "sample", "cond_sample", "row"):
        assert got[name].dtype == F32, name
        torch.testing.assert_close(real(got[name]), expected[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
