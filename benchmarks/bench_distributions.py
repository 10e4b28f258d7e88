"""Speed and accuracy of sosvae_lib.distributions against torch.distributions and dense routes.

Prints one table (times are medians over repeats, ratios are measured in the same run):
- log_prob + entropy at B = 25, R = 25, D ∈ {3·32·32, 3·64·64, 3·218·178}: ours vs
  torch.distributions.LowRankMultivariateNormal(validate_args=False), forward and forward + backward,
  for the paper's fixed scalar diagonal ε = 1e-5 and for a learned per-pixel diagonal;
- the hardware floor: one batched Gram GEMM PᵀP of the same factor;
- conditioning on a half-image mask at 3·64·64 against the best dense route (Cholesky of the observed
  m×m block), with the error of each against a float64 computation;
- float32 log_prob error against float64 at full CelebA size (d = 1e-5) for ours and torch.distributions.

Usage: python benchmarks/bench_distributions.py [--threads 2] [--repeats 7] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sosvae_lib.distributions import LowRankNormal  # noqa: E402

EPS = 1e-5
B, R = 25, 25


CLOCK = time.perf_counter  # --clock cpu switches to process CPU time (robust to other jobs at 1 thread)


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return 1e3 * statistics.median(times)


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median wall time (ms) of each function, timed round-robin so that every contender sees the same
    background load (this machine is shared; ratios stay meaningful when absolute times drift).

    Each timed call follows an untimed call of the same function, so every contender is measured in the
    steady state of a loop that repeats it (as in training), not in the cache and allocator state left by
    the previous contender (a backward's freed D×R gradients would otherwise be charged to the next call).
    """
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            fn()
            t0 = CLOCK()
            fn()
            times[k].append(CLOCK() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def make_case(D: int, learned: bool, seed: int = 0):
    """A decoder-like case: factor columns of different scales, x drawn from the model, P laid out as the
    decoder heads produce it (Pᵀ contiguous)."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.rand(B, D, generator=g)
    scales = torch.logspace(-2, -0.5, R)
    # the factor as the decoder heads hand it over: a [B, D, R] transposed view of a contiguous [B, R, D]
    P = (torch.randn(B, R, D, generator=g) * scales.unsqueeze(-1) / (D ** 0.5) * 30).mT
    if learned:
        d = torch.rand(B, D, generator=g) * 1e-2 + EPS
    else:
        d = torch.tensor(EPS)
    x = loc + (P @ torch.randn(B, R, 1, generator=g)).squeeze(-1) + d.sqrt() * torch.randn(B, D, generator=g)
    return loc, P, d, x


def time_logprob(D: int, learned: bool, repeats: int):
    loc, P, d, x = make_case(D, learned)
    loc = loc.requires_grad_()
    P = P.requires_grad_()
    d_ours = d.clone().requires_grad_(learned)
    d_td = (d.expand(B, D).clone() if not learned else d.clone()).requires_grad_(learned)

    def ours():
        m = LowRankNormal(loc, P, d_ours)
        return (m.log_prob(x) + m.entropy()).sum()

    def ref():
        m = torch.distributions.LowRankMultivariateNormal(loc, P, d_td, validate_args=False)
        return (m.log_prob(x) + m.entropy()).sum()

    def fwd(f):
        def run():
            with torch.no_grad():
                f()
        return run

    def fwdbwd(f):
        def run():
            f().backward()
            loc.grad = P.grad = d_ours.grad = d_td.grad = None
        return run

    reps = max(3, repeats if D < 50_000 else repeats // 2)
    Pd = P.detach()
    return interleaved_ms(dict(gram=lambda: torch.bmm(Pd.mT, Pd), ours_f=fwd(ours), td_f=fwd(ref),
                               ours_fb=fwdbwd(ours), td_fb=fwdbwd(ref)), reps)


def time_condition(repeats: int):
    """Half-image mask (top half of every channel observed) at 3·64·64, fixed diagonal ε."""
    D = 3 * 64 * 64
    loc, P, d, x = make_case(D, learned=False, seed=1)
    img = torch.zeros(3, 64, 64, dtype=torch.bool)
    img[:, :32] = True
    mask = img.reshape(1, D).expand(B, D)
    O = mask[0]
    U = ~O

    def ours(loc=loc, P=P, d=d, x=x):
        c = LowRankNormal(loc, P, d).condition(mask, x)
        return c.mean, c.cov_factor

    def dense_item(loc, P, d, x):
        # best dense route for one image: Cholesky of the observed m×m block Σ_OO (m = 6144, 151 MB in
        # float32), then mean_U = μ_U + Σ_UO Σ_OO⁻¹ (x_O − μ_O) and the Σ_OO⁻¹ P_O solve the factor needs.
        P_O, P_U = P[O], P[U]
        S_OO = P_O @ P_O.mT
        S_OO.diagonal().add_(d)
        L, info = torch.linalg.cholesky_ex(S_OO)
        if int(info) != 0:  # float32 Σ_OO with d = 1e-5 is numerically singular: add a small jitter
            S_OO.diagonal().add_(1e-6 * S_OO.diagonal().mean())
            L, _ = torch.linalg.cholesky_ex(S_OO)
        sol = torch.cholesky_solve((x[O] - loc[O]).unsqueeze(-1), L)
        mean_U = loc[U] + (P_U @ (P_O.mT @ sol)).squeeze(-1)
        W = torch.cholesky_solve(P_O, L)
        del S_OO, L
        return mean_U, W

    def dense(loc=loc, P=P, d=d, x=x, items=B):
        # one image at a time: a batched Σ_OO would need B·m² floats (3.8 GB here)
        return torch.stack([dense_item(loc[b], P[b], d, x[b])[0] for b in range(items)])

    t_ours = median_ms(ours, repeats)
    n_dense = 5  # time 5 of the 25 images and scale: the dense route is slow
    t_dense = median_ms(lambda: dense(items=n_dense), 3, warmup=0) * B / n_dense
    # accuracy of the conditional mean against float64 (our route in float64; the two agree to ~1e-10 there)
    ref_mean = ours(loc.double(), P.double(), d.double(), x.double())[0][:, U]
    err_ours = (ours()[0][:n_dense, U].double() - ref_mean[:n_dense]).abs().max().item()
    err_dense = (dense(items=n_dense).double() - ref_mean[:n_dense]).abs().max().item()
    dense64 = dense_item(loc[0].double(), P[0].double(), d.double(), x[0].double())[0]
    agree64 = (dense64 - ref_mean[0]).abs().max().item()
    return dict(ours=t_ours, dense=t_dense, err_ours=err_ours, err_dense=err_dense, agree64=agree64)


def accuracy_celeba():
    """float32 log_prob error vs float64 at D = 3·218·178, R = 25, d = 1e-5 (B = 4 images)."""
    D, Bk = 3 * 218 * 178, 4
    g = torch.Generator().manual_seed(2)
    loc = torch.rand(Bk, D, generator=g, dtype=torch.float64)
    P = torch.randn(Bk, D, R, generator=g, dtype=torch.float64) * torch.logspace(-2, -0.5, R, dtype=torch.float64)
    x = loc + (P @ torch.randn(Bk, R, 1, generator=g, dtype=torch.float64)).squeeze(-1) \
        + EPS ** 0.5 * torch.randn(Bk, D, generator=g, dtype=torch.float64)
    d64 = torch.tensor(EPS, dtype=torch.float64)
    ref = LowRankNormal(loc, P, d64).log_prob(x)
    ours32 = LowRankNormal(loc.float(), P.float(), d64.float()).log_prob(x.float()).double()
    td32 = torch.distributions.LowRankMultivariateNormal(loc.float(), P.float(), torch.full((D,), EPS),
                                                         validate_args=False).log_prob(x.float()).double()
    return dict(ours=(ours32 - ref).abs().max().item(), td=(td32 - ref).abs().max().item(),
                magnitude=ref.abs().max().item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="only D = 3·64·64")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or process CPU time (meaningful at --threads 1 on a busy machine)")
    ap.add_argument("--out", default=None, help="also write the table to this file (atomically)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    sizes = [3 * 64 * 64] if args.quick else [3 * 32 * 32, 3 * 64 * 64, 3 * 218 * 178]
    lines = [f"# bench_distributions: torch {torch.__version__}, {args.threads} threads, "
             f"{platform.processor() or platform.machine()}, B={B}, R={R}, medians of {args.repeats} runs "
             f"(round-robin), {args.clock} clock, load average at start {os.getloadavg()[0]:.1f}",
             "", "log_prob + entropy (times in ms; speed-up = torch.distributions time / ours)", ""]
    hdr = (f"{'D':>7} {'diagonal':<9} {'Gram PᵀP':>9} {'ours fwd':>9} {'td fwd':>8} {'speed-up':>8} "
           f"{'fwd/Gram':>8} {'ours f+b':>9} {'td f+b':>8} {'speed-up':>8}")
    lines += [hdr, "-" * len(hdr)]
    print("\n".join(lines), flush=True)
    for D in sizes:
        for learned in (False, True):
            r = time_logprob(D, learned, args.repeats)
            line = (f"{D:>7} {'learned' if learned else 'fixed ε':<9} {r['gram']:>9.2f} {r['ours_f']:>9.2f} "
                    f"{r['td_f']:>8.2f} {r['td_f'] / r['ours_f']:>7.1f}× {r['ours_f'] / r['gram']:>7.2f}× "
                    f"{r['ours_fb']:>9.2f} {r['td_fb']:>8.2f} {r['td_fb'] / r['ours_fb']:>7.1f}×")
            print(line, flush=True)
            lines.append(line)
    c = time_condition(args.repeats)
    block = ["", "condition on a half-image mask, D = 3·64·64 (m = 6144 observed), B = 25, float32",
             f"  ours (R×R capacitance)          {c['ours']:>9.2f} ms   max |mean error| vs float64 {c['err_ours']:.2e}",
             f"  dense (Cholesky of Σ_OO)        {c['dense']:>9.2f} ms   max |mean error| vs float64 {c['err_dense']:.2e}",
             f"  speed-up {c['dense'] / c['ours']:.0f}×; error ratio dense/ours {c['err_dense'] / c['err_ours']:.1f}× "
             f"(the two routes agree to {c['agree64']:.1e} in float64)"]
    print("\n".join(block), flush=True)
    lines += block
    if not args.quick:
        a = accuracy_celeba()
        block = ["", f"float32 log_prob error vs float64, D = 3·218·178, R = 25, d = 1e-5 (|log p| ≈ {a['magnitude']:.3g})",
                 f"  ours                {a['ours']:>10.3f} nats",
                 f"  torch.distributions {a['td']:>10.3f} nats"]
        print("\n".join(block), flush=True)
        lines += block
    lines.append(f"# load average at end {os.getloadavg()[0]:.1f}")
    print(lines[-1])
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench_", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
