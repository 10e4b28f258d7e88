"""Training-step throughput and peak memory of SOS-VAE (Langley et al., TMLR 2022) against the same network with
`torch.distributions.LowRankMultivariateNormal` (validation on, as the authors ran it) as the likelihood.

Both variants share the encoder, trunk and head weights (same initialisation) and the constrained objective; only
the distribution that scores x differs. Timing interleaves the two variants step by step in one process, so load
from other processes on the machine hits both alike; the reported images/s is the batch size over the median step
time. Peak memory is measured in a fresh subprocess per variant: on the CPU, the growth of the peak resident set
size (VmHWM, reset before the first step) during two training steps over the resident size just before them
(model and batch already allocated; Adam's state appears in the first step); on CUDA,
`torch.cuda.max_memory_allocated` of the steps.

    python benchmarks/bench_train.py [--steps 5] [--threads 2] [--configs paper,cpu] [--out FILE]
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
from sosvae_lib.config import TrainConfig  # noqa: E402
from sosvae_lib.distributions import LowRankNormal  # noqa: E402
from sosvae_lib.model import build_model  # noqa: E402
from sosvae_lib.objectives import make_objective  # noqa: E402

VARIANTS = ("sosvae", "torch-lowrank-mvn")
CONFIGS = {
    # the paper config: CelebA 218×178 RGB, latent 128, rank 25, widths 64…512; batch 4 on this CPU
    "paper": (TrainConfig.preset("paper", batch_size=4), (3, 218, 178)),
    # the cpu preset at ORL's 64×64 grayscale, its own batch size
    "cpu": (TrainConfig.preset("cpu"), (1, 64, 64)),
}


def _setup(name: str, device: torch.device):
    config, shape = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(config, shape).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    x = torch.rand(config.batch_size, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    return config, model, opt, make_objective(config), x


def train_step(model, opt, objective, x: torch.Tensor, variant: str) -> float:
    """One training step of the constrained objective with the likelihood of ``variant``; returns the loss."""
    b = x.shape[0]
    posterior = model.encode(x)
    z = posterior.rsample()
    loc, factor, diag = model.head.distribution_params(model.trunk(z))
    if variant == "sosvae":
        obs = LowRankNormal(loc, factor, diag)
    else:
        obs = LowRankMultivariateNormal(loc, factor, diag.expand_as(loc), validate_args=True)
    nll = -obs.log_prob(x.reshape(b, -1))
    kl = kl_divergence(posterior, Normal(torch.zeros_like(z), torch.ones_like(z))).sum(-1)
    loss = objective.loss(nll, kl)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    objective.update(objective.violations(kl))
    return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_config(name: str, steps: int, device: torch.device) -> dict:
    """Interleaved timing of both variants: median seconds per step and images per second."""
    runs = {v: _setup(name, device) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up (allocator, one-time kernels)
        _, model, opt, obj, x = runs[v]
        train_step(model, opt, obj, x, v)
    for _ in range(steps):
        for v in VARIANTS:
            _, model, opt, obj, x = runs[v]
            _sync(device)
            t0 = time.perf_counter()
            train_step(model, opt, obj, x, v)
            _sync(device)
            times[v].append(time.perf_counter() - t0)
    batch = runs[VARIANTS[0]][0].batch_size
    return {v: {"median_s": statistics.median(t), "images_per_s": batch / statistics.median(t),
                "all_s": [round(s, 4) for s in t]} for v, t in times.items()}


def time_likelihood(name: str, steps: int, device: torch.device) -> dict:
    """The likelihood alone: −log p(x|z) forward and backward for fixed head outputs of the config's network
    (the part of the step the two variants do not share), interleaved, median seconds."""
    _, model, _, _, x = _setup(name, device)
    b = x.shape[0]
    with torch.no_grad():
        loc, factor, diag = model.head.distribution_params(model.trunk(torch.randn(b, model.latent_dim,
                                                                                   device=device)))
    factor = factor + 0.01 * torch.randn_like(factor)  # away from the near-zero initial P
    flat = x.reshape(b, -1)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(steps + 1):
        for v in VARIANTS:
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


def memory_child(name: str, variant: str, device: torch.device) -> dict:
    """Run in a fresh process: peak memory of two training steps of one variant."""
    _, model, opt, obj, x = _setup(name, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(2):
            train_step(model, opt, obj, x, variant)
        torch.cuda.synchronize(device)
        return {"peak_step_bytes": torch.cuda.max_memory_allocated(device) - base, "kind": "cuda allocated"}
    _reset_peak_rss()
    base = _rss_bytes()
    for _ in range(2):
        train_step(model, opt, obj, x, variant)
    peak = _peak_rss_bytes()
    return {"peak_step_bytes": peak - base, "peak_rss_bytes": peak, "kind": "cpu rss"}


def measure_memory(name: str, variant: str, threads: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", name, variant, "--threads", str(threads), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="paper,cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).with_name("results_train.txt")))
    p.add_argument("--memory-child", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, device)))
        return

    lines = [f"# bench_train.py  {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}  "
             f"{platform.processor() or platform.machine()}  device {device}  threads {args.threads}  "
             f"load avg {os.getloadavg()[0]:.2f}  steps {args.steps}",
             "# training step = encode, reparameterise, decode, NLL + damped KL constraint, backward, Adam step",
             f"{'config':<8} {'likelihood':<20} {'batch':>5} {'s/step':>8} {'images/s':>9} {'peak step MiB':>14}"]
    ratios = []
    for name in args.configs.split(","):
        config, shape = CONFIGS[name]
        t = time_config(name, args.steps, device)
        mem = {v: measure_memory(name, v, args.threads, args.device) for v in VARIANTS}
        for v in VARIANTS:
            lines.append(f"{name:<8} {v:<20} {config.batch_size:>5} {t[v]['median_s']:>8.3f} "
                         f"{t[v]['images_per_s']:>9.2f} {mem[v]['peak_step_bytes'] / 2 ** 20:>14.1f}")
        lik = time_likelihood(name, max(args.steps, 5), device)
        lines.append(f"{name:<8} {'(likelihood only: NLL forward + backward)':<42} sosvae {lik['sosvae']:.4f} s, "
                     f"reference {lik['torch-lowrank-mvn']:.4f} s, ratio {lik['torch-lowrank-mvn'] / lik['sosvae']:.2f}x")
        speed = t["sosvae"]["images_per_s"] / t["torch-lowrank-mvn"]["images_per_s"]
        mem_ratio = mem["sosvae"]["peak_step_bytes"] / mem["torch-lowrank-mvn"]["peak_step_bytes"]
        ratios.append(f"{name}: {'x'.join(map(str, shape))} latent {config.latent} rank {config.rank} "
                      f"widths {config.width}..{min(config.width * 2 ** config.levels, config.max_width)}: "
                      f"speed ratio sosvae/reference = {speed:.2f}x, peak memory ratio = {mem_ratio:.2f} "
                      f"(step times sosvae {t['sosvae']['all_s']}, reference {t['torch-lowrank-mvn']['all_s']})")
        print("\n".join(lines[-3:]), flush=True)
    text = "\n".join(lines + [""] + ratios) + "\n"
    print(text)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
