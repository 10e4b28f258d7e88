"""Latency of the editor (sosvae_lib.editing, its widget sosvae_lib.widget) from a mouse release to the new image in the kernel.

At 64×64 RGB (D = 12,288) and R = 25, on 2 threads, medians over repeats of one stroke (a drag of 40 pointer
positions across the 512-pixel canvas, brush width 2) applied and then undone (untimed), so every timed stroke
starts from the same state:

- ``condition``: `LowRankNormal.condition` alone, on the mask of the stroke (O(D·R²));
- ``paint``: `Editor.paint` (rasterise the stroke, condition on every painted pixel, the new image);
- ``release → image``: the widget's mouse-release handler (`EditorUI._on_canvas_msg`) up to the new image bytes set
  on the canvas (screen → pixel mapping, paint, 8-bit RGBA encoding, the trait sync) — the issue's number;
- ``release, whole handler``: the same handler to its end (it then also outlines the strokes, draws the conditional
  samples beside the image and updates the status line).

Two sources: a model of the ``cpu`` preset built for 3×64×64 with rank 25 (untrained: the cost does not depend on
the weights), editing the mean of a prior draw, and a LowRankNormal with random factors (P laid out as the heads
make it, Pᵀ contiguous). Each is measured with no earlier stroke and with 9 earlier strokes. No frontend is
attached (widgets outside a kernel send nothing), so the time is the kernel's.

Usage: python benchmarks/bench_editor.py [--threads 2] [--repeats 25] [--out benchmarks/results_editor.txt]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sosvae_lib.config import TrainConfig  # noqa: E402
from sosvae_lib.distributions import LowRankNormal  # noqa: E402
from sosvae_lib.editing import Editor, screen_to_pixel  # noqa: E402
from sosvae_lib.model import build_model  # noqa: E402
from sosvae_lib.widget import EditorUI  # noqa: E402

SHAPE = (3, 64, 64)
RANK = 25
CANVAS = 512.0
GOAL_MS = 100.0


def drag(k: int, n: int = 40) -> list[list[float]]:
    """The k-th test drag: n pointer positions (CSS pixels) along a slanted line across the canvas."""
    y0 = 40.0 + 45.0 * (k % 10)
    return [[20.0 + 470.0 * t, y0 + 30.0 * t] for t in (i / (n - 1) for i in range(n))]


def timed(fn, undo, repeats: int) -> float:
    """Median ms of fn() over repeats, each followed by an untimed undo(); one untimed warm-up."""
    fn()
    undo()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        undo()
    return 1e3 * statistics.median(times)


def measure(editor: Editor, earlier: int, repeats: int) -> dict[str, float]:
    ui = EditorUI(editor, n_samples=4)
    editor.reset()
    for k in range(earlier):
        ui._on_canvas_msg(ui.canvas, {"type": "stroke", "points": drag(k + 1), "size": [CANVAS, CANVAS]})
    msg = {"type": "stroke", "points": drag(0), "size": [CANVAS, CANVAS]}
    points = [screen_to_pixel(x, y, (CANVAS, CANVAS), editor.hw) for x, y in msg["points"]]
    out: dict[str, float] = {}
    # condition alone, on the mask the stroke leaves (the earlier strokes' pixels included)
    editor.paint(points, 0.0, 2)
    mask, values = editor.mask.reshape(1, -1), editor.values.reshape(1, -1)
    editor.undo()
    base = editor._base
    out["condition"] = timed(lambda: base.condition(mask, values), lambda: None, repeats)
    out["paint"] = timed(lambda: editor.paint(points, 0.0, 2), editor.undo, repeats)
    handler_ms, image_ms = [], []

    def release():
        t0 = time.perf_counter()
        ui._on_canvas_msg(ui.canvas, msg)
        handler_ms.append(1e3 * (time.perf_counter() - t0))
        image_ms.append(ui.last_update_ms)

    release()
    editor.undo()
    handler_ms.clear()
    image_ms.clear()
    for _ in range(repeats):
        release()
        editor.undo()
    out["release → image"] = statistics.median(image_ms)
    out["release, whole handler"] = statistics.median(handler_ms)
    out["painted pixels"] = float(mask.sum() // SHAPE[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_editor.txt"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]

    torch.manual_seed(0)
    model = build_model(TrainConfig.preset("cpu", dataset="celeba", image_size=64, rank=RANK, device="cpu"),
                        SHAPE).eval()
    g = torch.Generator().manual_seed(0)
    d = math.prod(SHAPE)
    factor = (0.05 * torch.randn(1, RANK, d, generator=g)).transpose(1, 2)  # Pᵀ contiguous, as the heads make it
    random = LowRankNormal(0.5 + 0.1 * torch.randn(1, d, generator=g), factor, torch.tensor(1e-5))
    sources = {"cpu-preset model (prior draw)": Editor(model, seed=0),
               "random LowRankNormal": Editor(random, image_shape=SHAPE)}

    rows = []
    for name, editor in sources.items():
        for earlier in (0, 9):
            rows.append((name, earlier, measure(editor, earlier, args.repeats)))

    cols = ("condition", "paint", "release → image", "release, whole handler")
    lines = [f"# bench_editor: torch {torch.__version__}, {args.threads} threads, {platform.machine()}, "
             f"C×H×W = {'×'.join(map(str, SHAPE))} (D = {d}), R = {RANK}, canvas {CANVAS:.0f} CSS px, "
             f"medians of {args.repeats} strokes, wall clock, load average at start {load0:.1f}", "",
             "latency of one stroke (ms); goal: release → image ≤ 100 ms", "",
             f"{'source':32s} {'earlier':>7s} {'pixels':>6s} " + " ".join(f"{c:>22s}" for c in cols),
             "-" * 130]
    worst = 0.0
    for name, earlier, r in rows:
        lines.append(f"{name:32s} {earlier:7d} {int(r['painted pixels']):6d} "
                     + " ".join(f"{r[c]:22.2f}" for c in cols))
        worst = max(worst, r["release → image"])
    lines += ["", f"worst median release → image: {worst:.2f} ms "
                  f"({'within' if worst <= GOAL_MS else 'ABOVE'} the {GOAL_MS:.0f} ms goal)",
              f"# load average at end {os.getloadavg()[0]:.1f}"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
