"""Training on CUDA, proved on the CPU (issue 16): the device resolution, the cuDNN / TF32 / determinism flags, the
data path (`_batches`) and the step (`train_step`) with tensors that claim device ``cuda`` (tests/fake_cuda.py) or
live on ``meta``. A CPU tensor meeting a CUDA one, a CPU generator feeding a CUDA op, a pageable host-to-device copy
or a read-back the step does not document fails here."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist

from conftest import smoke_config as smoke
from fake_cuda import MetaStep, OpCounter, fake_cuda, real
from sosvae_lib import data as data_mod
from sosvae_lib import distributed
from sosvae_lib import model as model_mod
from sosvae_lib import train as train_mod
from sosvae_lib.config import TrainConfig
from sosvae_lib.distributed import DistContext
from sosvae_lib.distributions import deferred_checks

torch.set_num_threads(1)
CUDA = torch.device("cuda", 0)


# ---------------------------------------------------------------------------------------------------------------
# The device: `devices.cuda_problem` and `devices.resolve_device` (items 11, 12)

_DRIVER_TOO_OLD = ("The NVIDIA driver on your system is too old (found version 11040). Please update your GPU "
                   "driver by downloading and installing a new version from the URL: http://www.nvidia.com/Download/"
                   "index.aspx Alternatively, go to: https://pytorch.org to install a PyTorch version that has been "
                   "compiled with your version of the CUDA driver.")
_NO_DRIVER = ("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a "
              "driver from http://www.nvidia.com/Download/index.aspx")


def _cuda_fails_with(monkeypatch, message: str | None, build: str | None = "13.0") -> None:
    """torch.cuda.is_available() is False and initialising CUDA raises ``message`` (as torch does on such hosts)."""
    def init():
        raise RuntimeError(message)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(torch.version, "cuda", build)


@pytest.mark.parametrize("build, message, found", [
    (None, None, "a CPU-only build"),
    ("13.0", _NO_DRIVER, "no NVIDIA driver"),
    ("13.0", _DRIVER_TOO_OLD, "a driver too old for it (The NVIDIA driver on your system is too old (found version "
                              "11040))"),
    ("13.0", "No CUDA GPUs are available", "a driver but no visible CUDA device"),
])
def test_cuda_problem_names_the_build_and_what_was_found(monkeypatch, build, message, found):
    from sosvae_lib.devices import cuda_problem

    _cuda_fails_with(monkeypatch, message, build)
    problem = cuda_problem()
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"CUDA is unusable: torch {torch.__version__} (")
    assert ("(CUDA 13.0)" in problem) == (build is not None)
    assert problem.endswith(found if build is not None else "no CUDA support compiled in"), problem


def test_cuda_problem_runs_a_kernel_on_the_device(monkeypatch):
    from sosvae_lib.devices import cuda_problem

    with fake_cuda():  # a working (claimed) GPU
        assert cuda_problem() is None
    # CUDA says a device is there, but nothing can run on it (here: no driver behind the claim)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch: making a CUDA tensor fails before any driver check")
    problem = cuda_problem()
    assert problem is not None and problem.startswith("CUDA is unusable: ") and "cuda:0 unusable (" in problem


def test_auto_on_a_gpu_machine_whose_cuda_fails_warns_once_and_cuda_is_an_error(monkeypatch, capsys):
    # Through the old import path too: distributed.resolve_device is the same function.
    _cuda_fails_with(monkeypatch, _DRIVER_TOO_OLD)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: device: auto chose the CPU because CUDA is unusable: "
                                                   f"torch {torch.__version__} (CUDA 13.0) found a driver too old")
    with pytest.raises(ValueError, match=r"^device: 'cuda' was asked for but CUDA is unusable: torch .*too old"):
        distributed.resolve_device("cuda")
    with pytest.raises(ValueError, match="^device: must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        distributed.resolve_device("gpu")
    # a CPU machine (no driver at all): auto is the CPU, silently
    _cuda_fails_with(monkeypatch, _NO_DRIVER)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    assert capsys.readouterr().err == ""
    monkeypatch.undo()
    with fake_cuda():
        assert distributed.resolve_device("auto") == CUDA
        assert distributed.resolve_device("cuda:0") == CUDA


@pytest.fixture
def no_process_group(monkeypatch):
    """Fails the test if the code under test joins a process group (it must refuse before)."""
    def refuse(*args, **kwargs):
        raise AssertionError("init_process_group was called")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)


def test_each_torchrun_process_gets_a_gpu_of_its_own(monkeypatch, no_process_group):
    with fake_cuda():  # one GPU
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "1")
        with pytest.raises(ValueError, match=r"^device: the process of LOCAL_RANK 1 has no GPU of its own: 1 CUDA "
                                             r"device\(s\) are visible; start at most 1 processes per node"):
            distributed.init_distributed("cuda")
        with pytest.raises(ValueError, match="^device: the process of LOCAL_RANK 1"):
            distributed.init_distributed("auto")
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(ValueError, match=r"^device: 'cuda:0' would put all 2 processes of this torchrun job "
                                             r"on one GPU; give cuda or auto"):
            distributed.init_distributed("cuda:0")
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "device_count", lambda: 2)
            assert distributed.resolve_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
            assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
            with pytest.raises(ValueError, match=r"^device: 'cuda:2' was asked for but this machine has 2 CUDA"):
                distributed.resolve_device("cuda:2")


# ---------------------------------------------------------------------------------------------------------------
# cuDNN, TF32 and determinism flags (items 7, 10)

@pytest.fixture
def restore_backends(monkeypatch):
    """Puts back torch's process-wide flags that setup_run changes on CUDA, starting from torch 2.14's defaults
    (cuDNN convolutions in TF32)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    conv = getattr(cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")
    saved_new = (conv.fp32_precision, matmul.fp32_precision) if new_api else None
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn.allow_tf32 = True
    if new_api:
        conv.fp32_precision = "tf32"
    yield new_api
    cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
    if new_api:
        conv.fp32_precision, matmul.fp32_precision = saved_new


def _cuda_run(config: TrainConfig, **kw) -> train_mod.TrainState:
    return train_mod.setup_run(config, (1, 16, 16), DistContext(device=CUDA), **kw)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_float32_is_float32_on_cuda(restore_backends, precision):
    with fake_cuda():
        run = _cuda_run(smoke(precision=precision))
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    if restore_backends:  # torch >= 2.9 reads these first
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    # bf16 autocast is untouched (TF32 concerns float32 operations only)
    assert run.model.autocast_dtype == (None if precision == "fp32" else torch.bfloat16)


def test_deterministic_flag_sets_every_switch_on_cuda(restore_backends):
    assert TrainConfig().deterministic is False
    with pytest.raises(ValueError, match="^deterministic: must be True or False"):
        smoke(deterministic="yes")
    args = train_mod.build_parser().parse_args(["--out", "x", "--deterministic"])
    assert args.deterministic is True
    assert train_mod.build_parser().parse_args(["--out", "x"]).deterministic is None
    with fake_cuda():
        _cuda_run(smoke())
    assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False
    assert not torch.are_deterministic_algorithms_enabled()
    with fake_cuda():
        _cuda_run(smoke(deterministic=True))
    assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    # the CPU is left as it is (bitwise reproducible for a fixed thread count without any switch)
    torch.use_deterministic_algorithms(False)
    train_mod.setup_run(smoke(deterministic=True), (1, 16, 16))
    assert not torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------------------------------------------------------
# The NaN guard: O(1) kernels per step, still catching any parameter (item 9)

_OpCounter = OpCounter


def test_the_guard_launches_a_fixed_number_of_reductions_and_catches_every_parameter():
    run = train_mod.setup_run(smoke(head="lowrank-diag"), (1, 16, 16))
    params = list(run.model.parameters())
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with _OpCounter() as counter:
        train_mod.train_step(run, x)
    # the loss terms take a handful of sums; one per parameter (the old guard) would be > len(params)
    assert counter.ops["sum"] < len(params), (counter.ops["sum"], len(params))
    assert counter.ops["_foreach_norm"] == 1
    for i, p in enumerate(params):
        for bad in (float("nan"), float("inf")):
            handle = p.register_hook(lambda g, bad=bad: g.index_fill(0, torch.tensor([0]), bad))
            before = train_mod.weights_digest(run.model)
            try:
                with pytest.raises(FloatingPointError, match="^non-finite gradient at this step"):
                    train_mod.train_step(run, x)
            finally:
                handle.remove()
            assert train_mod.weights_digest(run.model) == before, i


def test_adam_on_cuda_is_the_fused_one_and_steps_like_the_cpu_one():
    config = smoke(head="lowrank-diag")
    cpu_run = train_mod.setup_run(config, (1, 16, 16))
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
             for i, p in enumerate(cpu_run.model.parameters())]
    for p, g in zip(cpu_run.model.parameters(), grads):
        p.grad = g.clone()
    cpu_run.optimizer.step()
    cpu_run.optimizer.step()
    with fake_cuda() as mode:
        run = _cuda_run(config)
        assert run.optimizer.defaults["fused"] is True
        for p, g in zip(run.model.parameters(), grads):
            p.grad = torch.empty_like(p).copy_(g.to(CUDA))  # the parameter's layout, as autograd gives it
        run.optimizer.step()
        del mode.events[:]
        with _OpCounter() as counter:
            run.optimizer.step()
        stepped = [real(p.detach()) for p in run.model.parameters()]
    assert mode.events == [] and sum(counter.ops.values()) <= 4 and counter.ops["_fused_adam_"] == 1
    for got, want in zip(stepped, cpu_run.model.parameters()):
        assert torch.allclose(got, want.detach(), rtol=1e-6, atol=1e-7)
    assert not cpu_run.optimizer.defaults["fused"]  # the CPU keeps its bits


# ---------------------------------------------------------------------------------------------------------------
# Transfers and read-backs (item 8, Build 2, Build 7)

@contextlib.contextmanager
def _meta_autocast():
    """torch.autocast refuses device_type "meta" even disabled: the model's float32 regions run as they are."""
    original = model_mod.VAE._autocast

    def autocast(self, t, enabled=True):
        return contextlib.nullcontext() if t.device.type == "meta" else original(self, t, enabled)

    model_mod.VAE._autocast = autocast
    try:
        yield
    finally:
        model_mod.VAE._autocast = original


@pytest.mark.parametrize("head, extra", [("lowrank", {}), ("lowrank-diag", {"entropy_target": -500.0}),
                                         ("diagonal", {}), ("lowrank", {"beta": 1.0})])
def test_a_whole_step_on_meta_reads_back_once_and_copies_nothing(head, extra):
    with _meta_autocast():
        run = train_mod.setup_run(smoke(head=head, **extra), (1, 16, 16), DistContext(device=torch.device("meta")))
        x = torch.rand(8, 1, 16, 16).to("meta")
        for pretrain in (True, False, False):
            with MetaStep() as mode:
                stats = train_mod.train_step(run, x, pretrain=pretrain)
            assert mode.events == [("sync",)], mode.events
            assert stats.device.type == "meta" and stats.shape == (5,) and stats.dtype == torch.float64


def _images(n: int = 23, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _dataset(images: torch.Tensor) -> data_mod.ImageDataset:
    return data_mod.ImageDataset("test", "train", images, flip=True)


@pytest.fixture
def accelerator(monkeypatch):
    """fake_cuda patches torch.cuda, not torch.accelerator, which DataLoader asks before pinning."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))


def _check_batches(batches: list[torch.Tensor], images: torch.Tensor, order: list[int], batch_size: int) -> None:
    """Each image is its stored pixels k, mirrored or not, dequantised into its own bin: x̃ = (k + u)/256 with
    u in [0, 1) (to float32 rounding), u spread uniformly; both mirrored and unmirrored images occur."""
    assert [b.shape[0] for b in batches] == [len(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    x = torch.cat(batches).double() * 256
    k = images[torch.tensor(order)].double()

    def in_bin(k):
        u = x - k
        return ((u >= -1e-4) & (u <= 1 + 1e-4)).flatten(1).all(1)

    same, mirrored = in_bin(k), in_bin(k.flip(-1))
    assert bool((same | mirrored).all())
    assert 0 < int((mirrored & ~same).sum()) and 0 < int((same & ~mirrored).sum())
    u = torch.where(same[:, None, None, None], x - k, x - k.flip(-1))
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.std()) - 12 ** -0.5) < 0.02


@pytest.mark.parametrize("on_device", [False, True])
def test_batches_on_cuda_copy_once_pinned_and_never_read_back(accelerator, on_device):
    images = _images()
    config = smoke(batch_size=5, data_on_device=on_device)
    cpu_run = train_mod.setup_run(config, (1, 16, 16), dataset=_dataset(images))
    expected = [x.clone() for x in train_mod._batches(cpu_run, 1)]
    order = list(iter(cpu_run.sampler))
    _check_batches(expected, images, order, 5)
    with fake_cuda() as mode:
        run = _cuda_run(config, dataset=_dataset(images))
        assert run.generator.device.type == "cuda"
        assert on_device or run.loader.pin_memory
        del mode.events[:]
        batches = list(train_mod._batches(run, 1))
    assert all(x.device == CUDA and x.is_contiguous(memory_format=torch.channels_last) for x in batches)
    # loader: one pinned, non-blocking copy per batch; data on the device: one for the epoch's order
    assert mode.events == [("h2d", True, True)] * (1 if on_device else len(batches)), mode.events
    assert mode.pageable_h2d == 0 and mode.syncs == 0
    # the fake device generator is a CPU one underneath: the same draws as the CPU run, so the same bits
    for got, want in zip(batches, expected):
        assert torch.equal(real(got), want)


def test_the_forward_pass_and_loss_of_a_cuda_step_match_the_cpu():
    config = smoke(head="lowrank-diag", entropy_target=-500.0, precision="fp32")
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    cpu_run = train_mod.setup_run(config, (1, 16, 16))
    torch.manual_seed(7)
    nll, kl, ent = cpu_run.step_module(x)
    want = cpu_run.objective.loss(nll, kl, ent)
    with fake_cuda() as mode:
        run = _cuda_run(config)
        xc = x.to(CUDA)
        del mode.events[:]
        torch.manual_seed(7)
        with torch.no_grad(), deferred_checks():  # as train_step runs it: the guard reads the checks' result
            terms = run.step_module(xc)
            loss = run.objective.loss(*terms)
            violations = run.objective.violations(terms[1], terms[2])
    assert mode.events == []
    assert loss.device == CUDA and violations.device == CUDA and all(t.device == CUDA for t in terms)
    assert torch.allclose(real(loss), want.detach(), rtol=1e-5)
    for got, ref in zip(terms, (nll, kl, ent)):
        assert torch.allclose(real(got), ref.detach(), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Pinned memory only for CUDA training (item 13)

def test_loader_memory_is_pinned_only_when_training_on_cuda(monkeypatch):
    ds = _dataset(_images(8))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, training on its CPU

    def no_cuda_state(*a, **k):
        raise AssertionError("a CPU run read the CUDA generators (a context on every GPU)")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_cuda_state)
    assert data_mod.make_loader(ds, 4, shuffle=False, seed=0).pin_memory is False
    assert data_mod.make_loader(ds, 4, shuffle=False, seed=0, pin_memory=True).pin_memory is True
    run = train_mod.setup_run(smoke(batch_size=4), (1, 16, 16), dataset=ds)
    assert run.loader.pin_memory is False
    assert "cuda" not in train_mod._rng_state()
