"""The SOS-VAE trainer (Langley et al., "Structured Uncertainty in the Observation Space of Variational
Autoencoders", TMLR 2022): one function used by notebooks, tests and the command line.

    python -m sosvae_lib.train --config smoke|cpu|paper --dataset NAME [--root PATH] --head NAME --rank R \
        --latent N --image-size PX --epochs E --target-kl T --seed S --out DIR [--resume] [--device auto|cpu|cuda|cuda:N]

The same command under ``torchrun --nproc_per_node=N`` trains with DistributedDataParallel (see
`sosvae_lib.distributed`). Each epoch rank 0 writes ``DIR/checkpoint.pt`` atomically, then ``DIR/metrics.csv``
and TensorBoard scalars in ``DIR/tb``; ``DIR/summary.json`` marks a finished run.

Same bits on every CPU: the data order of an epoch depends only on (seed, epoch); flips and dequantisation noise
are drawn in the training process from a generator reseeded from (seed, rank, epoch) at the start of every epoch
(so ``--num-workers`` changes nothing); the CPU uses the contiguous layout (`memory_format`). Two runs with the same
seed and thread count give the same weights, and ``--resume`` from a checkpoint reproduces the weights of an
uninterrupted run bit for bit. A non-finite loss or gradient stops the run before the optimiser step, naming the
epoch and batch; the last good checkpoint is left as it was.

Exit codes: 0 done; 2 a usage error, printed as one line naming the flag, path or file, before any data is loaded
or any file written (bad values, a missing or unreadable data folder, an ``--out`` that is a file or not writable,
a damaged checkpoint, a GPU that is not there, a folder another training holds); 1 a failed training.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt_io
from .config import ARCHS, HEADS, PRECISIONS, PRESETS, USAGE_ERRORS, TrainConfig, preset_fields
from .distributed import (DistContext, all_reduce_sum, cleanup, init_distributed, make_sampler, wrap_model)
from .distributions import deferred_checks
from .metrics import bits_per_dim, dequantize
from .model import VAE, build_model
from .objectives import make_objective

# Fields that may differ between a run and its resumption (everything else must match the checkpoint).
RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "root", "data_on_device", "compile")


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
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
    from .data import load_dataset

    options: dict[str, Any] = {}
    if config.max_items is not None:
        options["max_items"] = config.max_items
    if config.augment is not None:
        options["augment"] = config.augment
    return load_dataset(config.dataset, "train", image_size=config.image_size, root=config.root, **options)


def _check_resume_config(stored: TrainConfig, given: TrainConfig, done_epochs: int, out_dir: Path) -> TrainConfig:
    """The configuration a resumed run continues with: ``stored`` with the fields of `RESUMABLE_CHANGES` taken
    from ``given``; any other field that differs, or fewer epochs than already trained, is a ValueError naming it."""
    a, b = stored.to_dict(), given.to_dict()
    differ = [k for k in a if a[k] != b[k] and k not in RESUMABLE_CHANGES]
    if differ:
        k = differ[0]
        raise ValueError(f"{k}: the run being resumed was trained with {k}={a[k]!r}, got {b[k]!r} "
                         f"(only {', '.join(RESUMABLE_CHANGES)} may change on --resume)")
    if given.epochs < done_epochs:
        raise ValueError(f"epochs: the run in {out_dir} has already trained {done_epochs} epochs; give epochs >= "
                         f"{done_epochs} to resume it, or choose another out directory, got {given.epochs}")
    return stored.replace(**{k: b[k] for k in RESUMABLE_CHANGES})


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train the model ``config`` describes; write the run to ``out_dir``; return the summary dict.

    ``resume=True`` continues from ``out_dir/checkpoint.pt`` (starting fresh when there is none) up to
    ``config.epochs``; without it an existing checkpoint in ``out_dir`` is an error. The summary holds
    ``train_seconds``, ``epochs``, ``complete``, the last epoch's metrics, ``images_per_second`` and
    ``weights_sha256`` (returned on every rank; written to ``summary.json`` by rank 0).

    Everything that can be checked without data is checked before any data is loaded or file written: the
    device, ``out_dir`` (a writable folder), the checkpoint to resume (intact; its configuration compatible) —
    each a one-line error (see `sosvae_lib.config.USAGE_ERRORS`). While it runs, the training holds
    ``out_dir/train.lock``, so a second training into the same folder stops with `RunLockedError`.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: must be a TrainConfig, got {type(config).__name__}")
    out_dir = ckpt_io.check_out_dir(out_dir)
    ctx = init_distributed(config.device)
    try:
        config, state = _resumable_state(config, out_dir, resume)
        dataset = _load_train_set(config)
        if len(dataset) == 0:
            raise ValueError(f"dataset: {config.dataset!r} has no training images")
        if not ctx.is_main:
            return _train(config, out_dir, state, dataset, progress, ctx)
        with ckpt_io.run_lock(out_dir):
            if state is None and (out_dir / ckpt_io.CHECKPOINT).exists():
                raise ckpt_io.RunLockedError(f"out: another training wrote {out_dir / ckpt_io.CHECKPOINT} while "
                                             f"this one was loading its data; resume it or choose another --out")
            return _train(config, out_dir, state, dataset, progress, ctx)
    finally:
        cleanup(ctx)


def _resumable_state(config: TrainConfig, out_dir: Path, resume: bool) -> tuple[TrainConfig, dict | None]:
    """(configuration to train, verified checkpoint or None) for a run into ``out_dir``."""
    ckpt_path = out_dir / ckpt_io.CHECKPOINT
    if not ckpt_path.exists():
        return config, None
    if not resume:
        raise FileExistsError(f"out: {out_dir} already holds a run ({ckpt_io.CHECKPOINT}); pass resume=True "
                              f"(--resume) to continue it or choose another directory")
    state = ckpt_io.load_checkpoint(ckpt_path, map_location="cpu")
    return _check_resume_config(TrainConfig.from_dict(state["config"]), config, int(state["epoch"]), out_dir), state


@dataclass
class Run:
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
    bits: int
    dim: int
    dataset: Any = None
    loader: Any = None
    sampler: Any = None
    flip: bool = False
    device_images: torch.Tensor | None = None
    history: list = field(default_factory=list)
    train_seconds: float = 0.0


def setup_run(config: TrainConfig, image_shape: tuple[int, int, int], ctx: DistContext | None = None,
              dataset: Any = None, state: dict | None = None, forward_fn: Callable | None = None) -> Run:
    """Build the model (weights from ``config.seed``, or from the checkpoint ``state``), its optimiser and objective
    on ``ctx.device`` (default: the CPU, one process), and, given a ``dataset``, its loader. ``forward_fn``: see
    `_LossTerms` (the benchmark's reference likelihood)."""
    from .data import make_loader

    ctx = ctx or DistContext()
    device = ctx.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed image sizes: let cuDNN pick its fastest kernels once
    _seed_everything(config.seed)  # the initial weights depend on the seed only
    layout = memory_format(device)
    model = build_model(config, tuple(image_shape)).to(device).to(memory_format=layout)
    model.autocast_dtype = autocast_dtype(config.precision, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    objective = make_objective(config).to(device)
    run = Run(config=config, ctx=ctx, model=model, step_module=model, optimizer=optimizer, objective=objective,
              noise_params=model.noise_parameters(), layout=layout, bits=getattr(dataset, "bits", None) or 8,
              dim=math.prod(image_shape))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        objective.load_state_dict({"lambda": state["lambda"], "lambda_entropy": state.get("lambda_entropy", 0.0)})
        run.history = list(state["history"])
        run.train_seconds = float(state["train_seconds"])
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
    if config.data_on_device:
        images = getattr(dataset, "images", None)
        if not isinstance(images, torch.Tensor) or not hasattr(dataset, "unit"):
            raise ValueError(f"data_on_device: needs a data set held in memory as one tensor; {config.dataset!r} "
                             f"is decoded on demand here, use data_on_device=False")
        run.device_images = images.to(device)
    else:
        run.loader = make_loader(dataset, config.batch_size, shuffle=False, seed=config.seed,
                                 num_workers=config.num_workers, drop_last=False, sampler=run.sampler)
    return run


def train_step(run: Run, x: torch.Tensor, pretrain: bool = False, where: str = "this step") -> torch.Tensor:
    """One optimiser step on the batch ``x`` (on the device, flipped and dequantised: `_batches`). Returns the
    process-summed float64 statistics [loss, nll sum, kl sum, entropy sum, images] on the device.

    One host synchronisation, the NaN guard: a non-finite loss or gradient raises FloatingPointError (``where``
    names the batch) before the parameters change. Everything else, the multipliers included, stays on the device.
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
    grad_sum = torch.stack([g.sum() for g in grads]).sum() if grads else loss.new_zeros(())
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


def _batches(run: Run):
    """The epoch's batches, on the device, flipped and dequantised (the sampler's epoch must be set)."""
    from .data import flip_batch

    config, device = run.config, run.ctx.device
    if run.device_images is not None:
        order = torch.tensor(list(iter(run.sampler)), dtype=torch.long)
        source = (run.dataset.unit(run.device_images[idx.to(device)]) for idx in order.split(config.batch_size))
    else:
        source = (_first(batch) for batch in run.loader)
    for x in source:
        if run.flip:
            x = flip_batch(x)  # the global generator, reseeded every epoch (exact resume)
        x = x.to(device, non_blocking=True).contiguous(memory_format=run.layout)
        if config.dequantize:
            x = dequantize(x, bits=run.bits)  # the same generator
        yield x


def train_epoch(run: Run, epoch: int, bar: Any = None) -> dict[str, Any]:
    """Train epoch ``epoch`` (0-based); return its metric row (also appended to ``run.history``). Statistics are
    summed on the device and read once, at the end of the epoch."""
    config, ctx, objective = run.config, run.ctx, run.objective
    torch.manual_seed(_epoch_seed(config.seed, ctx.rank, epoch))
    run.sampler.set_epoch(epoch)
    pretrain = epoch < config.pretrain_epochs
    run.model.train()
    sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)  # loss, nll, kl, entropy, images
    t0 = time.perf_counter()
    for batch_idx, x in enumerate(_batches(run)):
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
        "nll_bpd": float(bits_per_dim(nll / n, run.dim, bits=run.bits if config.dequantize else 0)),
        "kl": kl / n, "target_kl": config.target_kl if config.beta is None else float("nan"),
        "lambda": objective.lam,
    }
    if objective.uses_entropy:
        row.update(entropy=ent / n, entropy_target=config.entropy_target, lambda_entropy=objective.lam_entropy)
    row.update(pretrain=int(pretrain), images=int(n), seconds=seconds, train_seconds=run.train_seconds)
    run.history.append(row)
    return row


def _save(run: Run, out_dir: Path, image_shape: list[int], writer: Any) -> None:
    """Rank 0: the checkpoint (with its digests), metrics.csv and TensorBoard scalars after an epoch."""
    model_state, optim_state = run.model.state_dict(), run.optimizer.state_dict()
    epoch = run.history[-1]["epoch"]
    ckpt_io.atomic_save({
        "model": model_state, "optimizer": optim_state, "lambda": run.objective.lam,
        "lambda_entropy": run.objective.lam_entropy, "rng": _rng_state(), "epoch": epoch,
        "config": run.config.to_dict(), "image_shape": image_shape, "history": run.history,
        "train_seconds": run.train_seconds, "weights_sha256": ckpt_io.tensor_digest(model_state),
        "optimizer_sha256": ckpt_io.tensor_digest(optim_state),
    }, out_dir / ckpt_io.CHECKPOINT)
    ckpt_io.write_metrics_csv(out_dir / ckpt_io.METRICS, run.history)
    if writer is not None:
        row = run.history[-1]
        for key in ("loss", "nll", "nll_bpd", "kl", "lambda", "entropy", "lambda_entropy"):
            if key in row:
                writer.add_scalar(f"train/{key}", row[key], epoch)
        writer.flush()


def _train(config: TrainConfig, out_dir: Path, state: dict | None, dataset, progress: bool,
           ctx: DistContext) -> dict:
    wall_start = time.perf_counter()
    image_shape = [int(v) for v in (dataset.images.shape[1:] if hasattr(dataset, "images")
                                    else _first(dataset[0]).shape)]
    run = setup_run(config, tuple(image_shape), ctx, dataset=dataset, state=state)
    start_epoch = int(state["epoch"]) if state is not None else 0

    writer = None
    if ctx.is_main:
        ckpt_io.atomic_write_json(out_dir / ckpt_io.CONFIG, config.to_dict())
        if state is not None:  # metrics.csv may be ahead of or behind the checkpoint if the run was killed
            ckpt_io.write_metrics_csv(out_dir / ckpt_io.METRICS, run.history)
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_epoch + 1)
        except ImportError:  # TensorBoard is optional: metrics.csv holds the same numbers
            writer = None

    bar = None
    if progress and ctx.is_main and config.epochs > start_epoch:
        from tqdm.auto import tqdm
        steps = math.ceil(len(run.sampler) / config.batch_size)
        bar = tqdm(total=(config.epochs - start_epoch) * steps, desc="train", dynamic_ncols=True, file=sys.stderr)
    try:
        for epoch in range(start_epoch, config.epochs):
            train_epoch(run, epoch, bar)
            if ctx.is_main:
                _save(run, out_dir, image_shape, writer)
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
        "final": run.history[-1] if run.history else {},
    }
    if ctx.is_main:
        ckpt_io.atomic_write_json(out_dir / ckpt_io.SUMMARY, summary)
    return dict(summary, process_rank=ctx.rank)


# ---------------------------------------------------------------------------------------------------------------
def _image_size(text: str) -> int | tuple[int, int]:
    """``64`` → 64; ``218x178`` → (218, 178)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be PX or HxW (e.g. 64 or 218x178), got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return (values[0], values[1])
    raise argparse.ArgumentTypeError(f"must be PX or HxW (e.g. 64 or 218x178), got {text!r}")


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
    p.add_argument("--head", choices=HEADS)
    p.add_argument("--arch", choices=ARCHS, help="resnet (light) | authors (the paper's network; the paper preset)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="encoder and trunk: fp32 | bf16 (autocast) | auto (bf16 on CUDA, fp32 on the CPU; default); "
                        "the likelihood is float32 always")
    p.add_argument("--image-size", type=_image_size, dest="image_size")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    for name, typ in [("rank", int), ("latent", int), ("width", int), ("levels", int), ("epochs", int),
                      ("batch-size", int), ("max-items", int), ("pretrain-epochs", int), ("seed", int),
                      ("num-workers", int), ("lr", float), ("target-kl", float), ("damping", float),
                      ("lambda-lr", float), ("entropy-target", float), ("beta", float), ("eps", float)]:
        p.add_argument(f"--{name}", type=typ, dest=name.replace("-", "_"))
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None, dest="data_on_device",
                   help="keep the whole uint8 training set on the device (small data sets on a GPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line describes. Without ``--resume`` (or with no checkpoint in ``--out``
    yet): the preset (default cpu) with the given flags. With ``--resume``: the configuration stored in the
    checkpoint, with the given flags and the given preset's fields on top; `train` then refuses any of them that
    differs from the stored run, naming it."""
    given = {k: v for k, v in vars(args).items()
             if k not in ("config", "out", "resume", "no_progress") and v is not None}
    ckpt_path = Path(args.out) / ckpt_io.CHECKPOINT
    if not (args.resume and ckpt_path.is_file()):
        return TrainConfig.preset(args.config or "cpu", **given)
    stored = TrainConfig.from_dict(ckpt_io.load_checkpoint(ckpt_path)["config"])
    fields = preset_fields(args.config) if args.config else {}
    fields.update(given)
    return stored.replace(**fields)


def main(argv: list[str] | None = None) -> int:
    """The command line. Exit codes: 0 done; 2 a usage error (one line naming the flag, path or file, raised
    before any data is loaded or any file written); 1 the training itself failed (a non-finite loss)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        summary = train(config, args.out, resume=args.resume, progress=not args.no_progress)
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
