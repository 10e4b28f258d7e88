"""The SOS-VAE trainer (Langley et al., "Structured Uncertainty in the Observation Space of Variational
Autoencoders", TMLR 2022): one function used by notebooks, tests and the command line.

    python -m sosvae_lib.train --config smoke|cpu|paper --dataset NAME [--root PATH] --head NAME --rank R \
        --latent N --image-size PX --epochs E --target-kl T --seed S --out DIR [--resume] [--device auto|cpu|cuda|cuda:N]

The same command under ``torchrun --nproc_per_node=N`` trains with DistributedDataParallel (see
`sosvae_lib.distributed`). Each epoch rank 0 writes ``DIR/checkpoint.pt`` atomically, then ``DIR/metrics.csv``
and TensorBoard scalars in ``DIR/tb``; ``DIR/summary.json`` marks a finished run.

What is bit-exact where. The data order of an epoch depends only on (seed, epoch); flips and dequantisation noise
are drawn on the training device from a generator of their own, reseeded from (seed, rank, epoch) at the start of
every epoch (so ``--num-workers`` changes nothing), and the model's own draws from torch's generators, reseeded
likewise. On the CPU (contiguous layout, `memory_format`): two runs with the same seed and thread count give the
same weights, and ``--resume`` reproduces the weights of an uninterrupted run bit for bit, with or without
``--deterministic``. On CUDA: only with ``--deterministic`` (`sosvae_lib.devices.configure_cuda`), and then on the
same GPU model, driver and torch build; without it (the default: cuDNN autotuning and atomic-add backward kernels
are faster) runs and resumptions agree to rounding, not to the bit. A CPU run and a CUDA run never agree bit for
bit (different kernels and random streams). A non-finite loss or gradient stops the run before the optimiser step,
naming the epoch and batch; the last good checkpoint is left as it was.

Exit codes: 0 done; 2 a usage error, printed as one line naming the flag, path or file, before any data is loaded
or any file written (bad values, a missing or unreadable data folder, an ``--out`` that is a file or not writable,
a damaged checkpoint, nothing to ``--resume``, a GPU that is not there, ``--compile`` on the CPU, a folder another
training holds); 1 a failed training; 130 Ctrl-C, printed as one line naming the epoch and the command that resumes
the run (the last checkpoint is the last finished epoch's, intact).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt_io
from ._checks import check_image_size
from .config import ARCHS, PRECISIONS, PRESETS, RESUMABLE_FIELDS, USAGE_ERRORS, TrainConfig, preset_fields
from .distributed import (DistContext, all_reduce_sum, cleanup, init_distributed, make_sampler, wrap_model)
from .devices import configure_cuda
from .distributions import deferred_checks
from .heads import head_names
from .metrics import bits_per_dim, dequantize
from .model import VAE, build_model
from .objectives import make_objective
from .runs import Run, bpd_bits, config_dataset, data_bits


class _LossTerms(nn.Module):
    """What the DDP wrapper runs: x → (nll [B], kl [B][, entropy [B]]) as plain tensors. ``forward_fn(vae, x)``
    replaces ``vae(x)`` (a dict with nll, kl, obs), e.g. to score x with another likelihood in a benchmark."""

    def __init__(self, vae: VAE, with_entropy: bool, forward_fn: Callable | None = None):
        super().__init__()
        self.vae = vae
        self.with_entropy = with_entropy
        self.forward_fn = forward_fn

    def forward(self, x: torch.Tensor):
        out = self.vae(x) if self.forward_fn is None else self.forward_fn(self.vae, x)
        if self.with_entropy:
            return out["nll"], out["kl"], out["obs"].entropy()
        return out["nll"], out["kl"]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (to compare weights across runs or processes bit for bit)."""
    return ckpt_io.tensor_digest(model.state_dict())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + epoch * 101 + 17) % (2 ** 63)


def _data_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of the data generator (flips, dequantisation noise) for an epoch: not `_epoch_seed`, whose stream
    the model's reparameterisation draws from on the same device (the same seed would correlate the two)."""
    return (_epoch_seed(seed, rank, epoch) ^ 0x9E3779B97F4A7C15) % (2 ** 63)


def _rng_state(generator: torch.Generator | None = None) -> dict:
    """The generators' states, for the record (a resumed run reseeds every epoch and needs none of them): Python's,
    numpy's, torch's CPU one, and ``generator``'s (the run's data generator, on its device) when given. No CUDA
    call otherwise: a CPU run on a GPU machine must not make a context on every GPU."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if generator is not None:
        state["data"] = generator.get_state()
    return state


def _first(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout of the model and batches: channels-last on CUDA (the fast cuDNN path), contiguous elsewhere.

    Not channels-last on the CPU: there the oneDNN backward of the 1×1 stride-2 skip convolution corrupted the
    heap with one thread and gave run-to-run differences with two on AMD EPYC hosts (torch 2.14.1), while the
    contiguous layout is bitwise reproducible on every host. The speed it gained (125 against 81 images/s at the
    cpu preset on 2 cores) is not worth results that depend on the host.
    """
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the encoder and trunk are autocast to: None for ``fp32``; bfloat16 for ``bf16``; for ``auto``
    bfloat16 on a CUDA device that supports it (a GPU trains the convolutions 2–4× faster so), else None (on the
    CPU bfloat16 autocast is slower than float32 on most hosts)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    raise ValueError(f"precision: must be one of auto, fp32, bf16, got {precision!r}")


def _load_train_set(config: TrainConfig):
    """The training set ``config`` describes (its ``max_items`` subset, flips as ``augment`` says)."""
    return config_dataset(config, "train", config.max_items, augment=config.augment)


def _check_resume_config(stored: TrainConfig, given: TrainConfig, done_epochs: int, out_dir: Path) -> TrainConfig:
    """The configuration a resumed run continues with: ``stored`` with the fields of
    `sosvae_lib.config.RESUMABLE_FIELDS` taken from ``given``; any other field that differs, or fewer epochs than
    already trained, is a ValueError naming it (`sosvae_lib.runs.Run.state` calls such a run stale)."""
    a, b = stored.to_dict(), given.to_dict()
    differ = [k for k in a if a[k] != b[k] and k not in RESUMABLE_FIELDS]
    if differ:
        k = differ[0]
        raise ValueError(f"{k}: the run being resumed was trained with {k}={a[k]!r}, got {b[k]!r} "
                         f"(only {', '.join(RESUMABLE_FIELDS)} may change on --resume)")
    if given.epochs < done_epochs:
        raise ValueError(f"epochs: the run in {out_dir} has already trained {done_epochs} epochs; give epochs >= "
                         f"{done_epochs} to resume it, or choose another out directory, got {given.epochs}")
    return stored.replace(**{k: b[k] for k in RESUMABLE_FIELDS})


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `train`. Its message is the one line the command prints (exit 130): the epoch that was
    running and the command that resumes the run, or that nothing was written. A KeyboardInterrupt, so code that
    stops on Ctrl-C still does."""


def _resume_command(out_dir: Path) -> str:
    return f"python -m sosvae_lib.train --out {shlex.quote(str(out_dir))} --resume"


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cap_workers(config: TrainConfig, ctx: DistContext) -> TrainConfig:
    """``config`` with ``num_workers`` capped at `_usable_cpus` (one warning line on stderr when capped): more
    worker processes than CPUs only cost their start-up (1000 workers took 53 s for 32 images), and the run's
    numbers do not depend on the worker count."""
    cpus = _usable_cpus()
    if config.num_workers <= cpus:
        return config
    if ctx.is_main:
        print(f"warning: num_workers: {config.num_workers} loader workers asked for, but this process may use {cpus} "
              f"CPUs; using {cpus}", file=sys.stderr)
    return config.replace(num_workers=cpus)


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train the model ``config`` describes; write the run to ``out_dir``; return the summary dict.

    ``resume=True`` continues from ``out_dir/checkpoint.pt`` up to ``config.epochs``; when there is none it starts
    afresh with ``config`` (a ``config.json`` left by a run killed before its first checkpoint is replaced; the
    command line's ``--resume`` instead continues that stored configuration, see `config_from_args`). Without
    ``resume`` an existing checkpoint in ``out_dir`` is an error. The summary holds ``train_seconds``, ``epochs``,
    ``complete``, the last epoch's metrics, ``images_per_second`` and ``weights_sha256`` (returned on every rank;
    written to ``summary.json`` by rank 0).

    ``config.root`` is stored absolute (a relative one is taken from the current folder), so the run can be
    evaluated from any folder. ``config.num_workers`` above the CPUs this process may use is capped at them, with
    one warning line on stderr (`_cap_workers`); the capped value is stored.

    Everything that can be checked without data is checked before any data is loaded or file written: the
    device, ``out_dir`` (a writable folder), the checkpoint to resume (intact; its configuration compatible),
    ``compile`` on the CPU (refused: `torch.compile` corrupted the heap of CPU training on AMD EPYC hosts) —
    each a one-line error (see `sosvae_lib.config.USAGE_ERRORS`). While it runs, the training holds
    ``out_dir/train.lock``, so a second training into the same folder stops with `RunLockedError`; an error found
    under the lock before anything was written (such as a rank above the image's dimension) leaves no file.

    Ctrl-C raises `TrainingInterrupted` (a KeyboardInterrupt) whose message names the epoch that was running and
    the command that resumes the run; the last checkpoint is that of the last finished epoch, intact.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: must be a TrainConfig, got {type(config).__name__}")
    run = Run(ckpt_io.check_out_dir(out_dir.folder if isinstance(out_dir, Run) else out_dir))
    if config.root is not None:  # absolute, so that the run can be evaluated from any folder
        config = config.replace(root=os.path.abspath(os.path.expanduser(config.root)))
    if config.init_from is not None:
        config = config.replace(init_from=os.path.abspath(os.path.expanduser(config.init_from)))
    ctx = init_distributed(config.device)
    try:
        config, state = _resumable_state(config, run, resume)
        init = _init_source(config, run) if state is None else None
        if config.compile and ctx.device.type == "cpu":
            raise ValueError("compile: torch.compile is refused on the CPU (CPU training under it corrupted the heap "
                             "on AMD EPYC hosts, and it was no faster: 0.94x at the cpu preset); use --no-compile "
                             "(compile=False), or a CUDA device")
        config = _cap_workers(config, ctx)
        dataset = _load_train_set(config)
        if len(dataset) == 0:
            raise ValueError(f"dataset: {config.dataset!r} has no training images")
        if not ctx.is_main:
            return _train(config, run, state, dataset, progress, ctx, init)
        with run.lock():
            if state is None and run.exists():
                raise ckpt_io.RunLockedError(f"out: another training wrote {run.checkpoint_path} while "
                                             f"this one was loading its data; resume it or choose another --out")
            return _train(config, run, state, dataset, progress, ctx, init)
    except KeyboardInterrupt as err:
        if isinstance(err, TrainingInterrupted):
            raise
        if run.started():
            raise TrainingInterrupted(f"interrupted before training started; resume with "
                                      f"`{_resume_command(run.folder)}`") from None
        raise TrainingInterrupted(f"interrupted before training started; nothing was written to {run.folder}") from None
    finally:
        cleanup(ctx)


def _resumable_state(config: TrainConfig, run: Run, resume: bool) -> tuple[TrainConfig, dict | None]:
    """(configuration to train, verified checkpoint or None) for a training into the folder ``run``."""
    if not run.checkpoint_path.exists():
        return config, None
    if not resume:
        raise FileExistsError(f"out: {run.folder} already holds a run ({run.checkpoint_path.name}); pass "
                              f"resume=True (--resume) to continue it or choose another directory")
    state = run.checkpoint(map_location="cpu")
    stored = TrainConfig.from_dict(state["config"])
    return _check_resume_config(stored, config, int(state["epoch"]), run.folder), state


# The fields a run and the run it starts from (``init_from``) must share: they fix the shapes of the weights taken.
INIT_FIELDS = ("dataset", "image_size", "arch", "latent", "width", "levels", "max_width")


def _init_source(config: TrainConfig, run: Run) -> dict | None:
    """The verified checkpoint of ``config.init_from`` (None without one), checked before any data is loaded: a
    finished run, not ``run`` itself, sharing `INIT_FIELDS` with ``config``. Each failure names ``init_from``."""
    if config.init_from is None:
        return None
    source = Run(config.init_from)
    if source.folder.resolve() == run.folder.resolve():
        raise ValueError(f"init_from: {source.folder} is the run being trained; give another run's folder")
    state = source.state()
    if state != "complete":
        what = "holds no run" if state == "absent" else "holds an unfinished run (resume it first)"
        raise ValueError(f"init_from: {source.folder} {what}; it must be the folder of a finished run")
    checkpoint = source.checkpoint(map_location="cpu")
    stored = TrainConfig.from_dict(checkpoint["config"])
    for name in INIT_FIELDS:
        if getattr(stored, name) != getattr(config, name):
            raise ValueError(f"init_from: {source.folder} was trained with {name}={getattr(stored, name)!r}, this "
                             f"run has {name}={getattr(config, name)!r}; they must match ({', '.join(INIT_FIELDS)})")
    return checkpoint


def _start_from(run: "TrainState", source: dict) -> None:
    """Load ``source`` (a checkpoint, `_init_source`) into a new run: every weight but the observation-noise head
    (encoder, trunk, mean head), and λ when the source has the same head; the optimiser stays fresh."""
    model = run.model
    noise = {id(p) for p in model.noise_parameters()}
    skip = {name for name, p in model.named_parameters() if id(p) in noise}
    own = model.state_dict()
    take = {k: v for k, v in source["model"].items() if k in own and k not in skip}
    missing = sorted(k for k in own if k not in skip and (k not in take or take[k].shape != own[k].shape))
    if missing:
        raise ValueError(f"init_from: the source run's weights do not fit this model ({len(missing)} tensors, "
                         f"first {missing[0]!r}); train the source with the same architecture")
    model.load_state_dict(take, strict=False)
    if source["config"]["head"] == run.config.head:
        run.objective.load_state_dict({"lambda": source["lambda"],
                                       "lambda_entropy": source.get("lambda_entropy", 0.0)})
    run.init_digest = str(source["weights_sha256"])


def train_config(config_fields: dict[str, Any] | None = None, *, preset: str = "smoke", dataset: str = "orl",
                 root: str | None = None, head: str = "lowrank", rank: int | None = None, seed: int = 0,
                 overrides: Any = None):
    """The TrainConfig of ``notebooks/01_train``: ``config_fields`` (every field, as `TrainConfig.to_dict` gives
    them: what `reproduce` passes, so the notebook trains exactly the configuration the plan checked) or, when
    None, ``TrainConfig.preset(preset, dataset=…, root=…, head=…, rank=… (None: the preset's), seed=…,
    **overrides)`` for a notebook run by hand. Bad values are one ValueError naming the parameter or field."""
    from .config import TrainConfig, check_mapping

    if config_fields is not None:
        return TrainConfig.from_dict(check_mapping("config_fields", config_fields, '{"dataset": "orl", "epochs": 2}'))
    overrides = check_mapping("overrides", {} if overrides is None else overrides, '{"epochs": 5}')
    return TrainConfig.preset(preset, dataset=dataset, root=root, head=head, seed=seed,
                              **({} if rank is None else {"rank": rank}), **overrides)


def ensure_trained(run: Run | str | os.PathLike, config: TrainConfig, progress: bool = False) -> Run:
    """"Train unless already trained": the `Run` of ``run``, after training ``config`` there unless it holds a
    finished run of it (`Run.state` is ``complete``). An interrupted run is resumed; a run of another
    configuration is refused with `train`'s error naming the field (nothing is deleted here)."""
    run = Run(run)
    if run.state(config) != "complete":
        train(config, run.folder, resume=True, progress=progress)
    return run


@dataclass
class TrainState:
    """What one training process holds: the model, optimiser, objective, data and history of a run (built by
    `setup_run`, advanced by `train_step` and `train_epoch`)."""

    config: TrainConfig
    ctx: DistContext
    model: VAE
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Any
    noise_params: list
    layout: torch.memory_format
    bits: int | None  # of the training set (`sosvae_lib.runs.data_bits`): 8, 16, or None for continuous data
    dim: int
    dataset: Any = None
    loader: Any = None
    sampler: Any = None
    flip: bool = False
    generator: torch.Generator | None = None  # flips and dequantisation noise, on the device (see _batches)
    device_images: torch.Tensor | None = None
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    init_digest: str | None = None  # weights_sha256 of the ``init_from`` run the weights started from


def setup_run(config: TrainConfig, image_shape: tuple[int, int, int], ctx: DistContext | None = None,
              dataset: Any = None, state: dict | None = None, forward_fn: Callable | None = None,
              init: dict | None = None) -> TrainState:
    """Build the model (weights from ``config.seed``, from the checkpoint ``state``, or, for a new run, from the
    ``init_from`` checkpoint ``init`` where `_start_from` says), its optimiser and objective
    on ``ctx.device`` (default: the CPU, one process), and, given a ``dataset``, its loader and the data generator
    (on the device). ``forward_fn``: see `_LossTerms` (the benchmark's reference likelihood).

    On CUDA this sets torch's process-wide switches (`sosvae_lib.devices.configure_cuda`): no TF32, and either
    cuDNN autotuning or, with ``config.deterministic``, deterministic algorithms. On the CPU it changes none.
    ``ctx.device`` may be ``meta`` (no dataset): the step's transfers are then counted without computing."""
    from .data import make_loader

    ctx = ctx or DistContext()
    device = ctx.device
    if device.type == "cuda":
        configure_cuda(config.deterministic)
    _seed_everything(config.seed)  # the initial weights depend on the seed only
    layout = memory_format(device)
    model = build_model(config, tuple(image_shape)).to(device).to(memory_format=layout)
    model.autocast_dtype = autocast_dtype(config.precision, device)
    # On CUDA the fused Adam: one kernel for all parameters, where the foreach one reads each parameter's step
    # counter back from host memory (148 host ops per step at the cpu preset). The CPU keeps the default (its bits).
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True if device.type == "cuda" else None)
    objective = make_objective(config).to(device)
    run = TrainState(config=config, ctx=ctx, model=model, step_module=model, optimizer=optimizer,
                     objective=objective, noise_params=model.noise_parameters(), layout=layout,
                     bits=data_bits(dataset), dim=math.prod(image_shape))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        objective.load_state_dict({"lambda": state["lambda"], "lambda_entropy": state.get("lambda_entropy", 0.0)})
        run.history = list(state["history"])
        run.train_seconds = float(state["train_seconds"])
        run.init_digest = state.get("init_from_weights_sha256")
    elif init is not None:
        _start_from(run, init)
    module: nn.Module = _LossTerms(model, objective.uses_entropy, forward_fn)
    if config.compile:
        module = torch.compile(module)
    run.step_module = wrap_model(module, ctx)
    if dataset is None:
        return run
    run.dataset = dataset
    # Flips are drawn here, in the training process, from the generator reseeded every epoch, not in loader
    # workers (whose generators persist across epochs): the run is then the same for any num_workers and resumes
    # exactly.
    run.flip = bool(getattr(dataset, "flip", False))
    if run.flip:
        dataset.flip = False
    run.sampler = make_sampler(dataset, ctx, config.seed, shuffle=True)
    run.generator = torch.Generator(device=device)  # reseeded at every epoch's start (_batches)
    if config.data_on_device:
        images = getattr(dataset, "images", None)
        if not isinstance(images, torch.Tensor) or not hasattr(dataset, "unit"):
            raise ValueError(f"data_on_device: needs a data set held in memory as one tensor; {config.dataset!r} "
                             f"is decoded on demand here, use data_on_device=False")
        run.device_images = images.to(device)
    else:
        run.loader = make_loader(dataset, config.batch_size, shuffle=False, seed=config.seed,
                                 num_workers=config.num_workers, drop_last=False, sampler=run.sampler,
                                 pin_memory=device.type == "cuda")
    return run


def train_step(run: TrainState, x: torch.Tensor, pretrain: bool = False, where: str = "this step") -> torch.Tensor:
    """One optimiser step on the batch ``x`` (on the device, flipped and dequantised: `_batches`). Returns the
    process-summed float64 statistics [loss, nll sum, kl sum, entropy sum, images] on the device.

    One host synchronisation, the NaN guard: a non-finite loss or gradient raises FloatingPointError (``where``
    names the batch) before the parameters change. Everything else, the multipliers included, stays on the device,
    and nothing is copied from the host. The gradients enter the guard through one fused reduction
    (``torch._foreach_norm``: on CUDA a few multi-tensor kernels for all parameters, not one kernel per parameter);
    a NaN or ±inf in any gradient makes its L2 norm, and so the packed sum, non-finite. (A finite gradient entry
    above ~1.8e19, whose float32 square overflows, is reported as non-finite too: such a step is lost anyway.)
    """
    objective, ctx = run.objective, run.ctx
    with deferred_checks():  # the guard below sees what the likelihood's own checks would
        terms = run.step_module(x)
    nll, kl = terms[0], terms[1]
    entropy = terms[2] if objective.uses_entropy else None
    loss = objective.loss(nll, kl, entropy)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if pretrain:  # mean pre-training: the covariance head stays at its initial value
        for p in run.noise_params:
            p.grad = None
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    grad_sum = torch.stack(torch._foreach_norm(grads)).sum() if grads else loss.new_zeros(())
    ent_sum = entropy.detach().sum() if entropy is not None else loss.new_zeros(())
    packed = torch.cat([torch.stack([loss.detach(), nll.detach().sum(), kl.detach().sum(), ent_sum]).double(),
                        loss.new_full((1,), x.shape[0], dtype=torch.float64), objective.violations(kl, entropy),
                        grad_sum.detach().double().view(1)])
    packed = all_reduce_sum(packed, ctx)
    if not bool(torch.isfinite(packed).all()):  # the step's one host synchronisation
        what = "loss" if not bool(torch.isfinite(packed[:5]).all()) else "gradient"
        raise FloatingPointError(f"non-finite {what} at {where}: training stopped before the optimiser step")
    run.optimizer.step()
    objective.update(packed[5:-1] / ctx.world_size)
    return packed[:5]


def _batches(run: TrainState, epoch: int):
    """Epoch ``epoch``'s batches (0-based) on the device, flipped and dequantised.

    Sets the sampler's epoch and reseeds ``run.generator`` from (seed, rank, epoch), so an epoch's batches depend
    only on those (exact ``--resume``; any ``num_workers``). Flips and dequantisation noise are drawn on the device
    from that generator. Host-to-device traffic: with a loader, one copy per batch (pinned by the loader on CUDA,
    non-blocking); with the data on the device, one pinned non-blocking copy of the epoch's order (from the
    sampler, the same order as the loader's), then batches are gathered on the device. No read-back.
    """
    from .data import flip_batch

    config, device, generator = run.config, run.ctx.device, run.generator
    run.sampler.set_epoch(epoch)
    generator.manual_seed(_data_seed(config.seed, run.ctx.rank, epoch))
    if run.device_images is not None:
        order = torch.tensor(list(iter(run.sampler)), dtype=torch.long)
        if device.type == "cuda":
            order = order.pin_memory()
        order = order.to(device, non_blocking=True)
        source = (run.dataset.unit(run.device_images[idx]) for idx in order.split(config.batch_size))
    else:
        source = (_first(batch) for batch in run.loader)
    for x in source:
        x = x.to(device, non_blocking=True).contiguous(memory_format=run.layout)
        if run.flip:
            x = flip_batch(x, generator)
        if config.dequantize and run.bits is not None:  # quantised data only (`sosvae_lib.runs.data_bits`)
            x = dequantize(x, generator, bits=run.bits)
        yield x


def train_epoch(run: TrainState, epoch: int, bar: Any = None) -> dict[str, Any]:
    """Train epoch ``epoch`` (0-based); return its metric row (also appended to ``run.history``). Statistics are
    summed on the device and read once, at the end of the epoch."""
    config, ctx, objective = run.config, run.ctx, run.objective
    torch.manual_seed(_epoch_seed(config.seed, ctx.rank, epoch))  # the model's draws (the reparameterisation)
    pretrain = epoch < config.pretrain_epochs
    run.model.train()
    sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)  # loss, nll, kl, entropy, images
    t0 = time.perf_counter()
    for batch_idx, x in enumerate(_batches(run, epoch)):
        try:
            sums += train_step(run, x, pretrain, f"epoch {epoch + 1}, batch {batch_idx + 1} (1-based)")
        except FloatingPointError as err:
            raise FloatingPointError(f"{err}; the last good checkpoint ({'none yet' if not epoch else epoch} "
                                     f"epochs) is left intact") from None
        if bar is not None:
            bar.update(1)
    loss, nll, kl, ent, n = sums.tolist()
    seconds = time.perf_counter() - t0
    run.train_seconds += seconds
    if bar is not None:
        bar.set_postfix_str(f"ep {epoch + 1}/{config.epochs} nll {nll / n:.4g} kl {kl / n:.3g} λ {objective.lam:.3g}")
    row: dict[str, Any] = {
        "epoch": epoch + 1, "loss": loss / n, "nll": nll / n,
        "nll_bpd": float(bits_per_dim(nll / n, run.dim, bits=bpd_bits(run.bits))),
        "kl": kl / n, "target_kl": config.target_kl if config.beta is None else float("nan"),
        "lambda": objective.lam,
    }
    if objective.uses_entropy:
        row.update(entropy=ent / n, entropy_target=config.entropy_target, lambda_entropy=objective.lam_entropy)
    row.update(pretrain=int(pretrain), images=int(n), seconds=seconds, train_seconds=run.train_seconds)
    run.history.append(row)
    return row


def _save(run: TrainState, folder: Run, image_shape: list[int], writer: Any) -> None:
    """Rank 0: the checkpoint (with its digests), metrics.csv and TensorBoard scalars after an epoch."""
    model_state, optim_state = run.model.state_dict(), run.optimizer.state_dict()
    epoch = run.history[-1]["epoch"]
    folder.write_checkpoint({
        "model": model_state, "optimizer": optim_state, "lambda": run.objective.lam,
        "lambda_entropy": run.objective.lam_entropy, "rng": _rng_state(run.generator), "epoch": epoch,
        "config": run.config.to_dict(), "image_shape": image_shape, "history": run.history,
        "train_seconds": run.train_seconds, "weights_sha256": ckpt_io.tensor_digest(model_state),
        "optimizer_sha256": ckpt_io.tensor_digest(optim_state), "init_from_weights_sha256": run.init_digest,
    })
    folder.write_history(run.history)
    if writer is not None:
        row = run.history[-1]
        for key in ("loss", "nll", "nll_bpd", "kl", "lambda", "entropy", "lambda_entropy"):
            if key in row:
                writer.add_scalar(f"train/{key}", row[key], epoch)
        writer.flush()


def _train(config: TrainConfig, folder: Run, state: dict | None, dataset, progress: bool,
           ctx: DistContext, init: dict | None = None) -> dict:
    wall_start = time.perf_counter()
    image_shape = [int(v) for v in (dataset.images.shape[1:] if hasattr(dataset, "images")
                                    else _first(dataset[0]).shape)]
    run = setup_run(config, tuple(image_shape), ctx, dataset=dataset, state=state, init=init)
    start_epoch = int(state["epoch"]) if state is not None else 0

    writer = None
    if ctx.is_main:
        folder.write_config(config)
        if state is not None:  # metrics.csv may be ahead of or behind the checkpoint if the run was killed
            folder.write_history(run.history)
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(folder.tensorboard_path), purge_step=start_epoch + 1)
        except ImportError:  # TensorBoard is optional: metrics.csv holds the same numbers
            writer = None

    bar = None
    if progress and ctx.is_main and config.epochs > start_epoch:
        from tqdm.auto import tqdm
        steps = math.ceil(len(run.sampler) / config.batch_size)
        bar = tqdm(total=(config.epochs - start_epoch) * steps, desc="train", dynamic_ncols=True, file=sys.stderr)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, config.epochs):
            train_epoch(run, epoch, bar)
            if ctx.is_main:
                _save(run, folder, image_shape, writer)  # atomic: Ctrl-C inside leaves the previous checkpoint
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted at epoch {epoch + 1} of {config.epochs}; resume with "
                                  f"`{_resume_command(folder.folder)}`") from None
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    images = sum(r["images"] for r in run.history)
    summary: dict[str, Any] = {
        "complete": True, "epochs": config.epochs, "train_seconds": run.train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "images_per_second": images / run.train_seconds if run.train_seconds > 0 else float("nan"),
        "dataset": config.dataset, "head": config.head, "rank": run.model.rank, "latent": config.latent,
        "image_shape": image_shape, "train_items": len(dataset), "world_size": ctx.world_size,
        "device": str(ctx.device), "weights_sha256": weights_digest(run.model), "config": config.to_dict(),
        "final": run.history[-1] if run.history else {}, "init_from_weights_sha256": run.init_digest,
    }
    if ctx.is_main:
        folder.write_summary(summary)
    return dict(summary, process_rank=ctx.rank)


# ---------------------------------------------------------------------------------------------------------------
def _image_size(text: str) -> int | tuple[int, int]:
    """``64`` → 64; ``218x178`` → (218, 178) (`sosvae_lib._checks.check_image_size`, the one parser)."""
    try:
        return check_image_size(text, text=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sosvae_lib.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=PRESETS,
                   help="preset to start from (default cpu; with --resume: the stored configuration)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: its stored configuration is the default of every field not "
                        "given; a given field that differs is an error (except epochs, device, num-workers, root)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dataset")
    p.add_argument("--root")
    p.add_argument("--head", choices=head_names())
    p.add_argument("--arch", choices=ARCHS, help="resnet (light) | authors (the paper's network; the paper preset)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="encoder and trunk: fp32 | bf16 (autocast) | auto (bf16 on CUDA, fp32 on the CPU; default); "
                        "the likelihood is float32 always")
    p.add_argument("--image-size", type=_image_size, dest="image_size")
    p.add_argument("--init-from", dest="init_from",
                   help="a finished run's folder: start from its encoder, trunk and mean-head weights (a shared mean "
                        "pre-training); the noise head, Adam and (for another head) λ start afresh")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    for name, typ in [("rank", int), ("latent", int), ("width", int), ("levels", int), ("epochs", int),
                      ("batch-size", int), ("max-items", int), ("pretrain-epochs", int), ("seed", int),
                      ("num-workers", int), ("lr", float), ("target-kl", float), ("damping", float),
                      ("lambda-lr", float), ("entropy-target", float), ("beta", float), ("eps", float)]:
        p.add_argument(f"--{name}", type=typ, dest=name.replace("-", "_"),
                       help=("data loader worker processes (0: load in the training process); more than the CPUs "
                             "this process may use are capped at that number, with a warning"
                             if name == "num-workers" else None))
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None, dest="data_on_device",
                   help="keep the whole uint8 training set on the device (small data sets on a GPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: the same seed gives the same bits and --resume continues bit for bit (deterministic "
                        "algorithms, no cuDNN autotuning; slower). Off by default; the CPU is bitwise without it")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line describes. Without ``--resume``: the preset (default cpu) with the given
    flags. With ``--resume``: the configuration stored in ``--out`` (its checkpoint's, or, for a run killed before
    its first checkpoint, its ``config.json``) with the given flags and the given preset's fields on top; any of
    them that differs from the stored run in a field other than `sosvae_lib.config.RESUMABLE_FIELDS` is refused
    naming it (by `train` against a checkpoint, here against a ``config.json``). A folder with neither is a
    FileNotFoundError: there is nothing to resume. A stored relative ``root`` (a run trained before roots were
    stored absolute) is found as `sosvae_lib.runs.resolve_root` says, unless ``--root`` is given."""
    given = {k: v for k, v in vars(args).items()
             if k not in ("config", "out", "resume", "no_progress") and v is not None}
    if not args.resume:
        return TrainConfig.preset(args.config or "cpu", **given)
    run = Run(ckpt_io.check_out_dir(args.out))  # a file given as --out: one line naming it, before anything is read
    if not run.started():
        raise FileNotFoundError(f"out: {run.folder} holds no run to resume (no {run.checkpoint_path.name} or "
                                f"{run.config_path.name}); drop --resume to start a new run there")
    stored = run.config  # the checkpoint's (its digests are checked by `train`), else config.json; root absolute
    fields = preset_fields(args.config) if args.config else {}
    fields.update(given)
    config = stored.replace(**fields)
    if not run.exists():  # nothing trained yet, but the run is the stored one: the checkpoint's rules
        config = _check_resume_config(stored, config, 0, run.folder)
    return config


def main(argv: list[str] | None = None) -> int:
    """The command line. Exit codes: 0 done; 2 a usage error (one line naming the flag, path or file, raised
    before any data is loaded or any file written); 1 the training itself failed (a non-finite loss); 130 Ctrl-C
    (one line: the epoch it stopped in and the command that resumes the run)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        summary = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt as e:
        print(str(e) if isinstance(e, TrainingInterrupted) else "interrupted before training started",
              file=sys.stderr)
        return 130
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except USAGE_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("process_rank", 0) == 0:
        final = summary["final"]
        if final:
            print(f"done: {summary['epochs']} epochs in {summary['train_seconds']:.1f} s "
                  f"({summary['images_per_second']:.1f} images/s); nll {final['nll']:.4g} nats "
                  f"({final['nll_bpd']:.4g} bpd), kl {final['kl']:.4g} (target {final['target_kl']}), "
                  f"λ {final['lambda']:.4g}; run in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
