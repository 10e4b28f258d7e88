"""What one training step of each run of a reproduction plan costs, counted on the ``meta`` device (nothing is
computed, no GPU needed): GFLOP (forward + backward + optimiser, `torch.utils.flop_counter`), ATen operations
dispatched (each is roughly one kernel launch on a GPU; views included), host read-backs and host-to-device copies
inside the step, and the steps of the whole run. From these, a wall-time estimate for one GPU:

    step time ≈ max(GFLOP / effective TFLOP/s, ATen ops × launch cost)

with the effective throughput and launch cost given on the command line (defaults: 100 TFLOP/s for bfloat16
convolutions of this size on an H100/H200-class GPU, 40 TFLOP/s in float32; 8 µs per operation, eager PyTorch).
These are assumptions, stated as such in the output; the counts are measurements of this code.

    python benchmarks/gpu_plan_cost.py [--scale gpu] [--tflops-bf16 100] [--tflops-fp32 40] [--launch-us 8]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_cuda import MetaStep, OpCounter  # noqa: E402
from sosvae_lib.distributed import DistContext  # noqa: E402
from sosvae_lib.reproduce import plan  # noqa: E402
from sosvae_lib.train import setup_run, train_step  # noqa: E402

# training images of each data set's training split (the CelebA subset's whole split; full Fashion-MNIST)
TRAIN_IMAGES = {"celeba": 7001, "orl": 320, "fashion-mnist": 55000}
CHANNELS = {"celeba": 3, "orl": 1, "fashion-mnist": 1}


_OpCounter = OpCounter


def step_cost(config, shape: tuple[int, int, int]) -> dict:
    """Counts of one training step (after a warm-up step) of ``config`` on the meta device."""
    run = setup_run(config.replace(device="cpu", compile=False, data_on_device=False), shape,
                    DistContext(device=torch.device("meta")))
    # autocast has no meta device: count the float32 graph (the same operations and FLOPs as under bf16 autocast)
    run.model._autocast = lambda *_a, **_k: contextlib.nullcontext()
    x = torch.rand(config.batch_size, *shape, device="meta")
    with MetaStep():
        train_step(run, x)  # warm-up: the optimiser creates its state
    flops = FlopCounterMode(display=False)
    counter = _OpCounter()
    with MetaStep() as meta, flops, counter:
        train_step(run, x)
    return {"gflop": flops.get_total_flops() / 1e9, "aten_ops": sum(counter.ops.values()),
            "syncs": meta.syncs, "pageable_h2d": meta.pageable_h2d}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="gpu")
    p.add_argument("--tflops-bf16", type=float, default=100.0)
    p.add_argument("--tflops-fp32", type=float, default=40.0)
    p.add_argument("--launch-us", type=float, default=8.0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    lines = [f"# step costs of the {args.scale} plan (meta device; torch {torch.__version__})",
             f"# assumed: {args.tflops_bf16:g} TFLOP/s effective in bf16 autocast, {args.tflops_fp32:g} in fp32, "
             f"{args.launch_us:g} µs per ATen op (eager)",
             "| run | batch | image | GFLOP/step | ATen ops/step | read-backs/step | pageable H2D/step | steps | "
             "est. min |", "|---|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for v in plan(args.scale):
        config = v.config()
        hw = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
        shape = (CHANNELS[v.dataset], int(hw[0]), int(hw[1]))
        n = TRAIN_IMAGES[v.dataset] if config.max_items is None else min(config.max_items, TRAIN_IMAGES[v.dataset])
        steps = config.epochs * math.ceil(n / config.batch_size)
        c = step_cost(config, shape)
        tflops = args.tflops_bf16 if config.precision in ("auto", "bf16") else args.tflops_fp32
        seconds = max(c["gflop"] / (tflops * 1e3), c["aten_ops"] * args.launch_us * 1e-6)
        minutes = steps * seconds / 60
        total += minutes
        lines.append(f"| {v.name} | {config.batch_size} | {'×'.join(map(str, shape))} | {c['gflop']:.1f} | "
                     f"{c['aten_ops']} | {c['syncs']} | {c['pageable_h2d']} | {steps} | {minutes:.1f} |")
        print(lines[-1], flush=True)
    lines.append(f"\ntraining total ≈ {total:.0f} min on one GPU (evaluation and notebooks not included)")
    text = "\n".join(lines) + "\n"
    print(lines[-1])
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
