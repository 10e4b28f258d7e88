"""Real-GPU tests (marker ``cuda``): skipped without a usable CUDA device. ``scripts/gpu_check.sh`` runs them on a
lent GPU (``pytest -m cuda``). ``SOSVAE_CUDA_TESTS_DEVICE=cpu`` runs the same tests on the CPU, to check the tests
themselves on a machine without a GPU; the CUDA semantics are proved on the CPU by the ``test_device_*`` files.

Each test compares the device's float32 numbers with a float64 (or CPU) reference: the low-rank log-density at the
paper's full image size, conditioning against the dense formula, a bf16 training step whose likelihood stays
float32, deterministic training, the calibration, the evaluation, the editor's operations and the face detector.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from sosvae_lib.config import TrainConfig
from sosvae_lib.distributions import LowRankNormal
from sosvae_lib.model import build_model

pytestmark = pytest.mark.cuda
F64 = torch.float64


def _device() -> torch.device:
    forced = os.environ.get("SOSVAE_CUDA_TESTS_DEVICE")
    if forced:
        return torch.device(forced)
    from sosvae_lib.devices import cuda_problem

    problem = cuda_problem()
    if problem:
        pytest.skip(f"no usable CUDA device: {problem}")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def device() -> torch.device:
    return _device()


def _smoke_model(device: torch.device, head: str = "lowrank", shape=(3, 16, 16), seed: int = 0):
    config = TrainConfig.preset("smoke", dataset="synthetic", head=head, device="cpu", seed=seed)
    torch.manual_seed(seed)
    return build_model(config, shape).to(device).eval(), config


def test_float32_log_prob_at_the_paper_size_matches_float64(device):
    """D = 3·218·178 = 116,412, R = 25, d = 1e-5: torch.distributions is hundreds of nats off in float32 here."""
    gen = torch.Generator().manual_seed(0)
    b, d, r = 2, 3 * 218 * 178, 25
    loc = torch.rand(b, d, generator=gen, dtype=F64)
    factor = 0.05 * torch.randn(b, d, r, generator=gen, dtype=F64)
    x = loc + (factor @ torch.randn(b, r, 1, generator=gen, dtype=F64)).squeeze(-1)
    x = x + 0.01 * torch.randn(b, d, generator=gen, dtype=F64)
    eps = torch.tensor(1e-5)
    ref = LowRankNormal(loc, factor, eps.double()).log_prob(x)
    got = LowRankNormal(loc.float().to(device), factor.float().to(device), eps.to(device)).log_prob(x.float().to(device))
    assert got.dtype == torch.float32 and got.device.type == device.type
    assert (got.double().cpu() - ref).abs().max().item() < 0.5, (got, ref)


def test_condition_matches_the_dense_formula(device):
    gen = torch.Generator().manual_seed(1)
    b, d, r = 3, 3 * 12 * 12, 10
    loc = torch.rand(b, d, generator=gen, dtype=F64)
    factor = 0.2 * torch.randn(b, d, r, generator=gen, dtype=F64)
    diag = 1e-3 + 1e-2 * torch.rand(b, d, generator=gen, dtype=F64)
    x = torch.rand(b, d, generator=gen, dtype=F64)
    mask = torch.rand(b, d, generator=gen) < torch.tensor([[0.1], [0.5], [0.9]])  # sizes differ across the batch
    q = LowRankNormal(loc.float().to(device), factor.float().to(device), diag.float().to(device)).condition(
        mask.to(device), x.float().to(device))
    for i in range(b):
        o, u = mask[i], ~mask[i]
        cov = factor[i] @ factor[i].T + torch.diag(diag[i])
        gain = cov[u][:, o] @ torch.linalg.inv(cov[o][:, o])
        mean_u = loc[i, u] + gain @ (x[i, o] - loc[i, o])
        got = q.mean[i].double().cpu()
        assert torch.allclose(got[u], mean_u, atol=2e-4), (i, (got[u] - mean_u).abs().max())
        assert torch.allclose(got[o], x[i, o], atol=1e-6)


def test_bf16_step_keeps_the_likelihood_float32(device):
    from sosvae_lib import train as T

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    config = TrainConfig.preset("smoke", dataset="synthetic", head="lowrank", device=str(device), precision="bf16")
    from sosvae_lib.distributed import DistContext

    run = T.setup_run(config, (1, 16, 16), DistContext(device=device))
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    stats = T.train_step(run, x)
    assert torch.isfinite(stats).all()
    out = run.model(x)
    assert out["nll"].dtype == torch.float32 and out["kl"].dtype == torch.float32


def _train_digest(tmp_path, device: torch.device, name: str) -> str:
    from sosvae_lib.train import train

    config = TrainConfig.preset("smoke", dataset="synthetic", head="lowrank", device=str(device), epochs=2,
                                max_items=64, deterministic=True)
    return train(config, tmp_path / name, progress=False)["weights_sha256"]


def test_deterministic_training_gives_the_same_bits(device, tmp_path):
    assert _train_digest(tmp_path, device, "a") == _train_digest(tmp_path, device, "b")


def test_calibration_on_the_device_matches_the_cpu(device):
    from sosvae_lib.calibration import calibrate_model

    model, _ = _smoke_model(torch.device("cpu"))
    images = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    cpu = calibrate_model(model, images, dequantize=False)
    dev = calibrate_model(model.to(device), images.to(device), dequantize=False)
    assert math.isclose(dev.scale, cpu.scale, rel_tol=1e-3), (dev, cpu)


def test_evaluation_on_the_device_matches_the_cpu(device):
    from sosvae_lib.evaluate import evaluate_model

    model, _ = _smoke_model(torch.device("cpu"))
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    opts = dict(k=2, batch_size=4, patch=4, seed=0, diag_scale=10.0)
    cpu = evaluate_model(model, images, **opts)
    dev = evaluate_model(model.to(device), images.to(device), **opts)
    for key in ("test_nll_bpd", "correction_rmse_uncond"):
        if key in cpu and cpu[key] is not None:
            assert math.isclose(dev[key], cpu[key], rel_tol=1e-3, abs_tol=1e-4), (key, dev[key], cpu[key])


def test_editor_operations_on_the_device(device):
    from sosvae_lib.editing import Editor

    model, _ = _smoke_model(torch.device("cpu"), shape=(1, 16, 16))
    image = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(4))
    results = {}
    for dev in (torch.device("cpu"), device):
        ed = Editor(model.to(dev), image=image.to(dev), device=dev)
        first = ed.paint([(4, 4), (4, 10)], value=0.0, width=1).detach().cpu()
        ed.undo()
        again = ed.image.detach().cpu()
        ed.paint([(4, 4), (4, 10)], value=0.0, width=1)
        results[dev.type] = (first, again, ed.samples(2).detach().cpu(), ed.explore([1.0]).detach().cpu())
    cpu, dev = results["cpu"], results[device.type]
    for a, b in zip(cpu, dev):
        assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()


def test_face_detector_on_the_device_matches_the_cpu(device):
    from sosvae_lib import faces

    if not faces.available():
        pytest.skip("facenet-pytorch is not installed")
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(4, 3, 64, 64, generator=gen)
    cpu = faces.FaceNet(device="cpu").features(images)
    dev = faces.FaceNet(device=device).features(images.to(device))
    assert torch.allclose(cpu, dev, atol=1e-3)
