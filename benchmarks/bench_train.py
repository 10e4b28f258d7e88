"""Training-step throughput and peak memory of SOS-VAE (Langley et al., TMLR 2022) against the same network with
`torch.distributions.LowRankMultivariateNormal` (validation on, float32, as the authors ran it) as the likelihood.

Every variant runs the trainer's own step (`sosvae_lib.train.train_step` on a `setup_run`): ours at each precision
(``fp32``; ``bf16``: encoder and trunk under bfloat16 autocast, the likelihood in float32), the reference with the
reference likelihood in float32. All share the network and its initialisation (the config's ``arch``); only the
likelihood and the precision differ. Timing interleaves the variants step by step in one process, so load from other
processes hits all alike; images/s is the batch size over the median step time. Peak memory is measured in a fresh
subprocess per variant: on the CPU, the growth of the peak resident set size (VmHWM, reset before the first step)
during two training steps over the resident size just before them; on CUDA, `torch.cuda.max_memory_allocated` of
the steps over the memory allocated before them.

    python benchmarks/bench_train.py [--device cpu|cuda|cuda:N] [--steps 5] [--threads 2] [--configs paper,cpu]
        [--precisions fp32,bf16] [--batch N] [--plan] [--out FILE]

Batch per config: paper 4 on the CPU, 25 (the paper's) on CUDA; cpu 25. ``--plan`` prints what would run and
exits (no model is built). A device that is not there or a bad option is one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.distributions import LowRankMultivariateNormal, Normal, kl_divergence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sosvae_lib.config import PRECISIONS as CONFIG_PRECISIONS  # noqa: E402
from sosvae_lib.config import TrainConfig  # noqa: E402
from sosvae_lib.distributed import DistContext, resolve_device  # noqa: E402
from sosvae_lib.distributions import LowRankNormal  # noqa: E402
from sosvae_lib.train import setup_run, train_step  # noqa: E402

REFERENCE = "reference"
PRECISIONS = tuple(p for p in CONFIG_PRECISIONS if p != "auto")  # the concrete ones; auto picks one of them
SHAPES = {"paper": (3, 218, 178), "cpu": (1, 64, 64)}  # the paper config: CelebA RGB; the cpu preset: ORL


def config_for(name: str, device: torch.device, batch: int | None = None) -> TrainConfig:
    """The benchmarked configuration: the named preset at the benchmark's batch size."""
    if name not in SHAPES:
        raise ValueError(f"configs: unknown config {name!r} (known: {', '.join(SHAPES)})")
    default = (25 if device.type == "cuda" else 4) if name == "paper" else 25
    return TrainConfig.preset(name, batch_size=batch or default, device=str(device))


def reference_forward(vae, x: torch.Tensor) -> dict:
    """The VAE's forward pass with `LowRankMultivariateNormal(validate_args=True)` as the likelihood, float32."""
    posterior = vae.encode(x)
    z = posterior.rsample()
    loc, factor, diag = (t.float() for t in vae.head.distribution_params(vae.trunk(z).float()))
    obs = LowRankMultivariateNormal(loc, factor, diag.expand_as(loc), validate_args=True)
    nll = -obs.log_prob(x.reshape(x.shape[0], -1).float())
    kl = kl_divergence(posterior, Normal(torch.zeros_like(z), torch.ones_like(z))).sum(-1)
    return dict(nll=nll, kl=kl, obs=obs)


def _variant_run(name: str, variant: str, device: torch.device, batch: int | None):
    config = config_for(name, device, batch)
    precision = "fp32" if variant == REFERENCE else variant.split("-")[1]
    run = setup_run(config.replace(precision=precision), SHAPES[name], DistContext(device=device),
                    forward_fn=reference_forward if variant == REFERENCE else None)
    x = torch.rand(config.batch_size, *SHAPES[name], generator=torch.Generator().manual_seed(1)).to(device)
    return run, x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_config(name: str, variants: list[str], steps: int, device: torch.device, batch: int | None) -> dict:
    """Interleaved timing of the variants: median seconds per step and images per second."""
    runs = {v: _variant_run(name, v, device, batch) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up (allocator, one-time kernels, cuDNN autotuning)
        train_step(*runs[v])
    for _ in range(steps):
        for v in variants:
            _sync(device)
            t0 = time.perf_counter()
            train_step(*runs[v])
            _sync(device)
            times[v].append(time.perf_counter() - t0)
    size = runs[variants[0]][1].shape[0]
    return {v: {"median_s": statistics.median(t), "images_per_s": size / statistics.median(t),
                "all_s": [round(s, 4) for s in t]} for v, t in times.items()}


def time_likelihood(name: str, steps: int, device: torch.device, batch: int | None) -> dict:
    """The likelihood alone: −log p(x|z) forward and backward for fixed head outputs of the config's network
    (the part of the step ours and the reference do not share), interleaved, median seconds."""
    run, x = _variant_run(name, "sosvae-fp32", device, batch)
    model, b = run.model, x.shape[0]
    with torch.no_grad():
        loc, factor, diag = model.head.distribution_params(model.trunk(torch.randn(b, model.latent_dim,
                                                                                   device=device)))
    factor = factor + 0.01 * torch.randn_like(factor)  # away from the near-zero initial P
    flat = x.reshape(b, -1)
    times: dict[str, list[float]] = {"sosvae": [], REFERENCE: []}
    for i in range(steps + 1):
        for v in times:
            lo, fa = loc.clone().requires_grad_(), factor.clone().requires_grad_()
            _sync(device)
            t0 = time.perf_counter()
            if v == "sosvae":
                nll = -LowRankNormal(lo, fa, diag).log_prob(flat)
            else:
                nll = -LowRankMultivariateNormal(lo, fa, diag.expand_as(lo), validate_args=True).log_prob(flat)
            nll.sum().backward()
            _sync(device)
            if i:  # the first round is a warm-up
                times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """VmHWM of this process's address space (unlike ru_maxrss it does not inherit the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    try:  # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_child(name: str, variant: str, device: torch.device, batch: int | None) -> dict:
    """Run in a fresh process: peak memory of two training steps of one variant."""
    run, x = _variant_run(name, variant, device, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(2):
            train_step(run, x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_step_bytes": peak - base, "peak_bytes": peak, "kind": "cuda max_memory_allocated"}
    _reset_peak_rss()
    base = _rss_bytes()
    for _ in range(2):
        train_step(run, x)
    peak = _peak_rss_bytes()
    return {"peak_step_bytes": peak - base, "peak_bytes": peak, "kind": "cpu rss"}


def measure_memory(name: str, variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", name, variant, "--threads", str(args.threads), "--device",
           args.device] + (["--batch", str(args.batch)] if args.batch else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="paper,cpu")
    p.add_argument("--precisions", default=None, help="ours at these precisions (default: fp32,bf16)")
    p.add_argument("--batch", type=int, default=None, help="batch size of every config (default: see above)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--plan", action="store_true", help="print the plan and exit")
    p.add_argument("--out", default=None, help="results file (default results_train.txt, _cuda for CUDA)")
    p.add_argument("--memory-child", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    return p


def plan(args: argparse.Namespace) -> dict:
    """What a run does: device, configs with their batch and shape, variants, output file. One ValueError naming
    the option for anything that cannot run here (checked before any model is built)."""
    if args.steps < 1 or args.threads < 1 or (args.batch is not None and args.batch < 1):
        raise ValueError(f"steps, threads, batch: must be integers >= 1, got {args.steps}, {args.threads}, "
                         f"{args.batch}")
    device = resolve_device(args.device)
    precisions = (args.precisions or ",".join(PRECISIONS)).split(",")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"precisions: must be among {', '.join(PRECISIONS)}, got {bad[0]!r}")
    configs = {name: config_for(name, device, args.batch) for name in args.configs.split(",")}
    out = args.out or str(Path(__file__).with_name(f"results_train{'_cuda' if device.type == 'cuda' else ''}.txt"))
    return {"device": device, "variants": [f"sosvae-{p}" for p in precisions] + [REFERENCE], "out": out,
            "configs": {n: {"batch": c.batch_size, "shape": SHAPES[n], "arch": c.arch, "latent": c.latent,
                            "rank": c.rank} for n, c in configs.items()}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        todo = plan(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = todo["device"]
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, device, args.batch)))
        return 0
    if args.plan:
        print(json.dumps({**todo, "device": str(device)}, indent=2))
        return 0
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                              or platform.machine())
    lines = [f"# bench_train.py  {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}  {name_of}  "
             f"device {device}  threads {args.threads}  load avg {os.getloadavg()[0]:.2f}  steps {args.steps}",
             "# training step (sosvae_lib.train.train_step) = encode, reparameterise, decode, NLL + damped KL "
             "constraint, backward, Adam step",
             f"{'config':<8} {'variant':<14} {'batch':>5} {'s/step':>8} {'images/s':>9} {'peak step MiB':>14} "
             f"{'vs reference':>13}"]
    ratios = []
    variants = todo["variants"]
    for name, spec in todo["configs"].items():
        t = time_config(name, variants, args.steps, device, args.batch)
        mem = {v: measure_memory(name, v, args) for v in variants}
        ref = t[REFERENCE]["images_per_s"]
        for v in variants:
            lines.append(f"{name:<8} {v:<14} {spec['batch']:>5} {t[v]['median_s']:>8.3f} "
                         f"{t[v]['images_per_s']:>9.2f} {mem[v]['peak_step_bytes'] / 2 ** 20:>14.1f} "
                         f"{t[v]['images_per_s'] / ref:>12.2f}x")
        lik = time_likelihood(name, max(args.steps, 5), device, args.batch)
        lines.append(f"{name:<8} (likelihood only: NLL forward + backward) sosvae {lik['sosvae']:.4f} s, "
                     f"reference {lik[REFERENCE]:.4f} s, ratio {lik[REFERENCE] / lik['sosvae']:.2f}x")
        best = max((v for v in variants if v != REFERENCE), key=lambda v: t[v]["images_per_s"])
        ratios.append(f"{name}: {'x'.join(map(str, spec['shape']))} arch {spec['arch']} latent {spec['latent']} "
                      f"rank {spec['rank']} batch {spec['batch']}: best ours {best} = "
                      f"{t[best]['images_per_s'] / ref:.2f}x the reference's images/s, peak memory ratio "
                      f"{mem[best]['peak_step_bytes'] / mem[REFERENCE]['peak_step_bytes']:.2f} "
                      f"(step times: " + "; ".join(f"{v} {t[v]['all_s']}" for v in variants) + ")")
        print("\n".join(lines[-len(variants) - 1:]), flush=True)
    text = "\n".join(lines + [""] + ratios) + "\n"
    print(text)
    tmp = Path(todo["out"]).with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, todo["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
