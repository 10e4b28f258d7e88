"""Real inpainting (`sosvae_lib.inpaint`) of trained runs under other inference settings than the defaults, on the
first N test images with the masks of `sosvae_lib.evaluate` (seed 0), at the run's calibrated diagonal:

- ``default``: z = m(x̂) of the image with its hidden pixels replaced by the training mean (2,000 training images),
  then the conditional p(x_H | x_O, z) (`inpaint`'s defaults: rounds=0, steps=0);
- ``rounds=2``: two re-fills with the conditional mean and encodings;
- ``steps=20``: 20 Adam steps on z of log p(x_O | z) + log p(z) (the exact low-rank marginal of the observed pixels);
- ``mu(z) only``: the default z, μ(z) on the hidden pixels without the conditioning step (a diagnostic).

RMSE on the hidden pixels of the raw (not dequantised) test images, so the default differs slightly from the
``real_inpaint_rmse_*`` of ``eval_test.json`` (200 dequantised images); seconds are wall time of the 4 mask families
on this machine (their ratio is the stable part).

Usage: python benchmarks/inpaint_options.py RUN_DIR [RUN_DIR ...] [--images 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from sosvae_lib import evaluate as E
from sosvae_lib import inpaint as I
from sosvae_lib.runs import Run

SETTINGS = (("default", {}), ("rounds=2", dict(rounds=2)), ("steps=20", dict(steps=20)))


def measure(run: Run, n: int) -> dict:
    model = run.load_model()
    x = run.images("test", n)
    fill = run.images("train", 2000).mean(0)
    cal = run.calibration()
    scale = None if cal is None else cal.scale
    _, _, _, _, masks, _ = E._setup(x, 10, 0, torch.device("cpu"))
    with torch.no_grad():
        m = masks(0, model.decode(model.encode(x).loc))
    out: dict = {"run": run.folder.name, "images": x.shape[0]}
    for label, options in SETTINGS:
        t0 = time.perf_counter()
        scores = I.RealInpaintScores(**options)
        scores.add(model, x, m, fill, diag_scale=scale)
        result = scores.result()
        out[label] = {f: round(result[f"real_inpaint_rmse_{f}"], 4) for f in I.REAL_INPAINT_FAMILIES}
        out[label]["seconds"] = round(time.perf_counter() - t0, 2)
    only = {}
    for f in I.REAL_INPAINT_FAMILIES:
        res = I.inpaint(model, x, m[f], fill=fill, diag_scale=scale)
        with torch.no_grad():
            loc = model.decode(res.z).loc
        hidden = ~res.observed
        err = (loc - x.reshape(x.shape[0], -1)).square()[hidden].sum()
        only[f] = round(math.sqrt(float(err) / int(hidden.sum())), 4)
    out["mu(z) only"] = only
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run folders (evaluated, for their calibration)")
    p.add_argument("--images", type=int, default=40, help="test images (default 40)")
    p.add_argument("--out", help="also write the lines to this file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lines = [json.dumps(measure(Run(r), args.images)) for r in args.runs]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        from sosvae_lib._io import atomic_write_text
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
