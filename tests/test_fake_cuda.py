"""The fake-CUDA harness itself (tests/fake_cuda.py): it must fail where a GPU fails, or the device tests prove
nothing."""

import pytest
import torch

from fake_cuda import ClaimedCuda, DeviceMixError, MetaStep, fake_cuda, real


def test_claimed_tensors_compute_the_cpu_values():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with fake_cuda():
        c = a.to("cuda") @ b.cuda()
        assert c.device == torch.device("cuda", 0) and isinstance(c, ClaimedCuda)
        assert torch.zeros(2, device="cuda").device.type == "cuda"
        assert torch.tensor([1.0], device="cuda").device.type == "cuda"
    assert torch.equal(real(c), a @ b)


def test_a_cpu_tensor_meeting_a_cuda_one_raises_and_a_cpu_scalar_does_not():
    with fake_cuda():
        x = torch.ones(4, device="cuda")
        with pytest.raises(DeviceMixError):
            x + torch.ones(4)
        with pytest.raises(DeviceMixError):
            x + torch.tensor(2.0).expand(4)  # what distributions.py did with a 0-dim CPU diagonal
        assert (x + torch.tensor(2.0)).device.type == "cuda"


def test_generators_must_match_the_device():
    with fake_cuda():
        g = torch.Generator(device="cuda").manual_seed(0)
        assert torch.rand(3, device="cuda", generator=g).device.type == "cuda"
        with pytest.raises(DeviceMixError, match="generator"):
            torch.rand(3, device="cuda", generator=torch.Generator().manual_seed(123))


def test_transfers_and_read_backs_are_recorded():
    with fake_cuda() as mode:
        x = torch.ones(4).to("cuda")
        y = torch.ones(4).pin_memory().to("cuda", non_blocking=True)
        float(x.sum()), x.tolist(), x.cpu()
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
    assert mode.events[:2] == [("h2d", False, False), ("h2d", True, True)]
    assert mode.pageable_h2d == 1 and mode.syncs == 3


def test_a_module_moves_and_runs_forward():
    net = torch.nn.Conv2d(1, 2, 3)
    x = torch.rand(1, 1, 5, 5)
    expected = net(x).detach()
    with fake_cuda():  # Module.to moves the module itself
        net_c = net.to("cuda")
        assert net_c.weight.device.type == "cuda"
        with torch.no_grad():
            out = net_c(x.cuda())
        with pytest.raises(DeviceMixError):
            net_c(x)
    assert torch.allclose(real(out), expected)


def test_meta_step_counts_read_backs_and_copies():
    net = torch.nn.Linear(3, 1).to("meta")
    opt = torch.optim.Adam(net.parameters())
    with MetaStep() as mode:
        loss = net(torch.rand(5, 3).to("meta")).sum()
        loss.backward()
        assert bool(torch.isfinite(loss))
        opt.step()
    assert mode.syncs == 1 and mode.pageable_h2d == 1
