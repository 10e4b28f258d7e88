"""CUDA semantics of the evaluation, proved on the CPU (issue 16, Build 2): calibration, every inpainting mask family,
the PPCA baseline and the face metrics run with tensors that claim device ``cuda`` (`fake_cuda`), where a CPU
tensor meeting a CUDA one raises, and give the numbers of the CPU run. Read-backs are counted: those of the
evaluation code must not grow with the number of batches. (`LowRankNormal.condition` still checks its inputs with
three read-backs per call, in sosvae_lib/distributions.py: they are counted apart.)"""

from __future__ import annotations

import contextlib
import copy
import math
import traceback

import pytest
import torch

from fake_cuda import fake_cuda, real
from sosvae_lib import calibration as C
from sosvae_lib import metrics as M
from sosvae_lib import pca as P
from sosvae_lib.config import TrainConfig
from sosvae_lib.evaluate import evaluate_model, evaluate_pca
from sosvae_lib.model import build_model

torch.set_num_threads(1)
SHAPE = (3, 12, 12)


def _model(head: str = "lowrank"):
    """A smoke-preset VAE with random weights moved away from their near-zero initial factor (float32, eval)."""
    config = TrainConfig.preset("smoke", dataset="synthetic", head=head, device="cpu")
    torch.manual_seed(0)
    model = build_model(config, SHAPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _images(n: int, seed: int) -> torch.Tensor:
    """8-bit levels k/255 in [0, 1] (dequantisation applies)."""
    return torch.randint(0, 256, (n, *SHAPE), generator=torch.Generator().manual_seed(seed)).float() / 255


def _on_cuda(model):
    """A copy of ``model`` moved to the claimed cuda device (call inside fake_cuda)."""
    return copy.deepcopy(model).to("cuda")


class _Origins(list):
    """FakeCuda.events that also count each read-back by the sosvae_lib file that made it."""

    def __init__(self):
        super().__init__()
        self.by_file: dict[str, int] = {}

    def append(self, event):
        if event[0] in ("sync", "d2h"):
            frames = [f.filename for f in traceback.extract_stack() if "sosvae_lib" in f.filename]
            name = frames[-1].rsplit("/", 1)[-1] if frames else "(test)"
            self.by_file[name] = self.by_file.get(name, 0) + 1
        super().append(event)


@contextlib.contextmanager
def _fake_cuda_counting():
    """fake_cuda() whose mode also yields ``events.by_file``."""
    with fake_cuda() as mode:
        mode.events = _Origins()
        yield mode


def _evaluation_syncs(mode) -> int:
    """Read-backs outside distributions.py (whose conditioning checks are counted apart, see the docstring)."""
    return sum(n for name, n in mode.events.by_file.items() if name != "distributions.py")


def _same(cpu: dict, dev: dict, rel: float = 1e-6) -> None:
    assert set(cpu) == set(dev)
    for key, value in cpu.items():
        got = dev[key]
        if isinstance(value, float) and math.isfinite(value):
            assert isinstance(got, float), (key, got)
            assert got == pytest.approx(value, rel=rel, abs=1e-9), key
        else:
            assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got)), key


@pytest.mark.parametrize("head", ["lowrank", "lowrank-diag"])
def test_calibrate_model_on_cuda_matches_the_cpu(head):
    model, images = _model(head), _images(10, 1)
    cpu = C.calibrate_model(model, images, batch_size=4, generator=torch.Generator().manual_seed(3))
    with fake_cuda() as mode:
        dev = C.calibrate_model(_on_cuda(model), images.to("cuda"), batch_size=4,
                                generator=torch.Generator().manual_seed(3))
    assert dev.scale == pytest.approx(cpu.scale, rel=1e-9)
    assert dev.nll_calibrated == pytest.approx(cpu.nll_calibrated, rel=1e-9)
    assert (dev.eps is None) == (head == "lowrank-diag")
    # the statistics stay on the device: the read-backs are those of the scale search, not one per batch
    with fake_cuda() as one_batch:
        C.calibrate_model(_on_cuda(model), images.to("cuda"), batch_size=10,
                          generator=torch.Generator().manual_seed(3))
    assert mode.syncs == one_batch.syncs


def test_diag_scale_statistics_of_a_scalar_diagonal_on_cuda():
    """issue 16 item 1: the scalar ε's Σ log d_i was made on the CPU, then added to the CUDA statistics."""
    gen = torch.Generator().manual_seed(0)
    loc, factor = torch.rand(3, 20, generator=gen), 0.1 * torch.randn(3, 20, 2, generator=gen)
    x = loc + 0.01 * torch.randn(3, 20, generator=gen)
    cpu = C.diag_scale_statistics(loc, factor, torch.tensor(1e-5), x)
    with fake_cuda():
        stats = C.diag_scale_statistics(loc.cuda(), factor.cuda(), torch.tensor(1e-5).cuda(), x.cuda())
        nll = stats.nll(30.0)
        assert nll.device.type == "cuda" and stats.log_diag.device.type == "cuda"
    assert torch.allclose(real(nll), cpu.nll(30.0), rtol=1e-12)


@pytest.mark.parametrize("head", ["lowrank", "diagonal"])
def test_evaluate_model_on_cuda_matches_the_cpu(head):
    """Every key (IWAE, calibrated IWAE, all mask families at both diagonals, generation metrics) as on the CPU."""
    model, images = _model(head), _images(6, 2)
    scale = None if head == "diagonal" else 40.0
    opts = dict(k=2, batch_size=3, patch=4, seed=0, diag_scale=scale)
    cpu = evaluate_model(model, images, **opts)
    with _fake_cuda_counting() as mode:
        dev = evaluate_model(_on_cuda(model), images.to("cuda"), **opts)
    _same(cpu, dev)
    for f in M.INPAINT_FAMILIES:
        assert f"correction_nll_bpd_cond_{f}" in dev
    # read-backs do not grow with the number of batches (statistics accumulate on the device)
    with _fake_cuda_counting() as one_batch:
        evaluate_model(_on_cuda(model), images.to("cuda"), **dict(opts, batch_size=6))
    assert _evaluation_syncs(mode) == _evaluation_syncs(one_batch) < 20


def test_ppca_fitted_and_scored_on_cuda_matches_the_float64_cpu_result():
    """issue 16 item 14: the baseline on the model's device gives the float64 CPU numbers (NLL within 1e-9 bpd)."""
    train, test = _images(20, 4), _images(6, 5)
    fit = P.fit_pca(train.reshape(20, -1), 3)
    cpu = evaluate_pca(fit, test, batch_size=3, patch=4)
    with _fake_cuda_counting() as mode:
        fit_dev = P.fit_pca(train.reshape(20, -1).to("cuda"), 3)
        assert fit_dev.mean.device.type == "cuda" and fit_dev.components.device.type == "cuda"
        assert fit_dev.mean.dtype == torch.float64
        dev = evaluate_pca(fit_dev, test.to("cuda"), batch_size=3, patch=4)
    assert fit_dev.noise_var == pytest.approx(fit.noise_var, rel=1e-12)
    assert dev["test_nll_bpd"] == pytest.approx(cpu["test_nll_bpd"], abs=1e-9)
    _same(cpu, dev, rel=1e-9)
    with _fake_cuda_counting() as one_batch:
        fit_dev = P.fit_pca(train.reshape(20, -1).to("cuda"), 3)
        evaluate_pca(fit_dev, test.to("cuda"), batch_size=6, patch=4)
    assert _evaluation_syncs(mode) == _evaluation_syncs(one_batch) < 20


def test_evaluate_run_on_cuda_matches_the_cpu_and_fits_the_baseline_there(tmp_path, monkeypatch):
    """`evaluate(run, device="cuda")`: calibration, the model's metrics and the PPCA baseline (issue 16 item 14:
    fitted on the model's device, no longer on the CPU while the GPU idles) give the CPU run's numbers."""
    from sosvae_lib import evaluate as E
    from sosvae_lib.train import train

    train(TrainConfig.preset("smoke", max_items=8), tmp_path / "run", progress=False)
    fitted_on = []

    def spy(train_images, *args, **kwargs):
        fitted_on.append(train_images.device.type)
        return P.fit_pca(train_images, *args, **kwargs)

    monkeypatch.setattr(E, "fit_pca", spy)
    opts = dict(k=2, num_images=6, progress=False, write=False)
    cpu = E.evaluate(tmp_path / "run", **opts)
    with fake_cuda():
        dev = E.evaluate(tmp_path / "run", device="cuda", **opts)
    assert fitted_on == ["cpu", "cuda"]
    assert math.isfinite(dev["pca_test_nll_bpd"]) and dev["eps_calibrated"] is not None
    cpu.pop("eval_seconds"), dev.pop("eval_seconds")
    _same(cpu, dev, rel=1e-9)


def _faces_rgb(n: int) -> torch.Tensor:
    """n ORL test faces at 64×64, grey repeated to RGB (MTCNN finds a face in each)."""
    from sosvae_lib.data import load_dataset

    ds = load_dataset("orl", "test", image_size=64, max_items=n)
    return torch.stack([ds[i][0] if isinstance(ds[i], (tuple, list)) else ds[i] for i in range(n)]).float().repeat(
        1, 3, 1, 1)


def test_face_metrics_on_cuda_match_the_cpu():
    """MTCNN (facenet-pytorch) on a claimed-CUDA device: detection, O-net features, the blurred reference and the
    face scores of `evaluate_model` give the CPU numbers; our code hands it CPU images, which it moves itself."""
    from sosvae_lib import faces

    if not faces.available():
        pytest.skip("facenet-pytorch is not installed")
    real_faces = _faces_rgb(4)
    blurred = faces.gaussian_blur(real_faces, 2.0)
    ref = faces.face_reference(real_faces, faces.FaceNet())
    model, images = _model(), _images(4, 6)
    opts = dict(k=1, batch_size=4, patch=4, seed=0, face_images=4)
    cpu = evaluate_model(model, images, face_reference=dict(ref, net=faces.FaceNet()), **opts)
    with fake_cuda():
        net = faces.FaceNet(device="cuda")
        assert next(net.mtcnn.parameters()).device.type == "cuda"
        blurred_dev = faces.gaussian_blur(real_faces.to("cuda"), 2.0)
        ref_dev = faces.face_reference(real_faces.to("cuda"), net)
        dev = evaluate_model(_on_cuda(model), images.to("cuda"), face_reference=dict(ref_dev, net=net), **opts)
    assert torch.allclose(real(blurred_dev), blurred, atol=1e-6)
    assert ref["face_rate_real"] == ref_dev["face_rate_real"] == 1.0
    assert ref_dev["face_rate_blur2"] == ref["face_rate_blur2"]
    assert ref_dev["fd_blur2"] == pytest.approx(ref["fd_blur2"], rel=1e-5)
    assert torch.allclose(ref_dev["features"], ref["features"], atol=1e-5)
    for key in ("face_rate_means", "face_rate_samples", "fd_means", "fd_samples"):
        assert dev[key] == pytest.approx(cpu[key], rel=1e-5), key


def test_face_metrics_draw_beyond_the_generation_metrics(monkeypatch):
    """issue 19: the face metrics count ``face_images`` prior draws even when fewer images are scored (512 faces on
    200 test images in the cpu preset): the first draws and every other metric are those of a shorter run."""
    import sosvae_lib.evaluate as E

    seen = []
    monkeypatch.setattr(E, "_face_metrics", lambda means, samples, shape, ref: seen.append((means, samples)) or {})
    model, images = _model(), _images(4, 6)
    opts = dict(k=1, batch_size=4, patch=4, seed=0, face_reference={"net": None})
    short = evaluate_model(model, images, face_images=4, **opts)
    long = evaluate_model(model, images, face_images=10, **opts)
    (means4, samples4), (means10, samples10) = seen
    assert means4.shape[0] == samples4.shape[0] == 4 and means10.shape[0] == samples10.shape[0] == 10
    assert torch.equal(means10[:4], means4) and torch.equal(samples10[:4], samples4)
    assert short == long
    plain = evaluate_model(model, images, face_images=10, **dict(opts, face_reference=None))
    assert plain == short and len(seen) == 2  # no face reference: no extra draws, the same numbers
    # the PPCA baseline likewise (its "means" are the one global mean)
    fit = P.fit_pca(_images(20, 7).reshape(20, -1).double(), 3)
    pca_opts = {key: value for key, value in opts.items() if key != "k"}
    short, long = (evaluate_pca(fit, images, face_images=f, **pca_opts) for f in (4, 10))
    (_, pca4), (_, pca10) = seen[2:]
    assert pca4.shape[0] == 4 and pca10.shape[0] == 10 and torch.equal(pca10[:4], pca4) and short == long


def _planted_ppca_data(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(48, 4, generator=gen, dtype=torch.float64)).Q
    z = torch.randn(n, 4, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    return 0.5 + z @ basis.T + 0.02 * torch.randn(n, 48, generator=gen, dtype=torch.float64)


def test_randomised_ppca_on_cuda_matches_the_exact_float64_cpu_fit(monkeypatch):
    """The randomised SVD (min(N, D) > 2048 in practice) draws its test matrix on the CPU from ``seed``: the same
    fit on every device, and within 1e-6 bpd of the exact float64 CPU fit on held-out data."""
    train, test = _planted_ppca_data(300, 0), _planted_ppca_data(50, 1)
    exact = P.fit_pca(train, 4)
    monkeypatch.setattr(P, "_EXACT_LIMIT", 10)
    approx_cpu = P.fit_pca(train, 4, seed=3)
    with fake_cuda():
        approx = P.fit_pca(train.to("cuda"), 4, seed=3)
        bpd = M.gaussian_bpd(approx.distribution(50, dtype=torch.float64), test.to("cuda")).mean()
        assert bpd.device.type == "cuda"
    assert torch.equal(real(approx.components), approx_cpu.components)
    ref = float(M.gaussian_bpd(exact.distribution(50, dtype=torch.float64), test).mean())
    assert float(real(bpd)) == pytest.approx(ref, abs=1e-6)
    assert approx.noise_var == pytest.approx(exact.noise_var, rel=1e-6)


@pytest.mark.cuda
def test_ppca_on_a_real_gpu_matches_the_float64_cpu_fit():
    """On a real GPU (skipped without one): the baseline fitted and scored there in float64 gives the CPU's
    test NLL within 1e-6 bpd, and evaluate_pca's keys within 1e-6 (relative)."""
    from sosvae_lib.devices import cuda_problem

    problem = cuda_problem()
    if problem:
        pytest.skip(f"no usable CUDA device: {problem}")
    train, test = _images(40, 7), _images(12, 8)
    fit = P.fit_pca(train.reshape(40, -1), 5)
    cpu = evaluate_pca(fit, test, batch_size=5, patch=4)
    dev = evaluate_pca(P.fit_pca(train.reshape(40, -1).cuda(), 5), test.cuda(), batch_size=5, patch=4)
    assert dev["test_nll_bpd"] == pytest.approx(cpu["test_nll_bpd"], abs=1e-6)
    for key, value in cpu.items():
        if isinstance(value, float) and math.isfinite(value):
            assert dev[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_mask_and_noise_helpers_follow_the_device():
    """Masks are made where their inputs live; noise is drawn on the generator's device (a CPU generator: the same
    draws as a CPU run, then one copy through pinned memory)."""
    shape = (2, 6, 5)
    cpu_masks = (M.random_pixel_masks(3, shape, generator=torch.Generator().manual_seed(0)),
                 M.patch_masks(shape, torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]), 3),
                 M.half_masks(3, shape, "left"))
    x = _images(3, 9)
    ref = M.dequantize(x, torch.Generator().manual_seed(1))
    with fake_cuda() as mode:
        g = torch.Generator(device="cuda").manual_seed(0)
        dev_masks = (M.random_pixel_masks(3, shape, generator=g),
                     M.patch_masks(shape, torch.tensor([0, 1, 2]).cuda(), torch.tensor([2, 1, 0]).cuda(), 3),
                     M.half_masks(3, shape, "left", device="cuda"))
        variance = torch.rand(2, 60).cuda()
        tops, lefts = M.most_uncertain_patch(variance, shape, 3)
        out = M.dequantize(x.cuda(), torch.Generator().manual_seed(1))
        before = mode.pageable_h2d
        M.dequantize(x.cuda(), torch.Generator().manual_seed(1))
        assert mode.pageable_h2d == before + 1  # the images' own copy; the noise goes through pinned memory
    for a, b in zip(cpu_masks, dev_masks):
        assert b.device.type == "cuda" and torch.equal(a, real(b))
    assert tops.device.type == "cuda" and lefts.device.type == "cuda"
    assert torch.equal(real(out), ref)
