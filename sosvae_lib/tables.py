"""The metrics table of the SOS-VAE reproduction (Langley et al., "Structured Uncertainty in the Observation
Space of Variational Autoencoders", TMLR 2022): one row per (dataset, head, rank), gathered from the evaluation
results that `sosvae_lib.evaluate.evaluate` stores in each run folder (`sosvae_lib.runs.Run.evaluation`).

Each evaluated run gives its own row and, from the keys prefixed ``pca_``, a row for the global PPCA baseline of the
same rank fitted on the same training set (head ``pca``; rows of the same dataset and rank from several runs are
merged, the first kept). Written as CSV (every column) and Markdown (the headline columns), atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ._io import atomic_write_text
from .heads import head_names, head_spec
from .runs import Run

# The columns of metrics.csv, in order (issue 6); then the calibration and the inpainting mask families (issue 12);
# the extra keys below follow them. `sosvae_lib.reproduce` re-evaluates a run whose test evaluation lacks one of COLUMNS.
INPAINT_FAMILIES = ("random50", "patch10", "patch10_maxvar", "top_half", "left_half")  # = metrics.INPAINT_FAMILIES
INPAINT_COLUMNS = tuple(key for f in INPAINT_FAMILIES for key in (
    f"correction_rmse_uncond_{f}", f"correction_rmse_cond_{f}", f"correction_rmse_cond_{f}_cal",
    f"correction_nll_bpd_uncond_{f}", f"correction_nll_bpd_cond_{f}", f"correction_nll_bpd_uncond_{f}_cal",
    f"correction_nll_bpd_cond_{f}_cal"))
REAL_INPAINT_FAMILIES = ("top_half", "left_half", "random50", "patch10")  # = inpaint.REAL_INPAINT_FAMILIES
REAL_INPAINT_COLUMNS = tuple(key for f in REAL_INPAINT_FAMILIES for key in (
    f"real_inpaint_rmse_{f}", f"real_inpaint_nll_bpd_{f}", f"real_inpaint_rmse_{f}_train_mean"))
COLUMNS = ("dataset", "head", "rank", "latent", "epochs", "test_nll_bpd", "elbo_bpd", "kl_nats", "target_kl",
           "residual_corr_samples", "residual_corr_data", "span_capture", "correction_rmse_uncond", "correction_rmse_cond",
           "spectrum_dist_mean", "spectrum_dist_samples", "train_seconds",
           "eps_calibrated", "diag_scale_calibrated", "test_nll_bpd_calibrated") + REAL_INPAINT_COLUMNS + INPAINT_COLUMNS
# Face metrics (CelebA with facenet-pytorch only; `sosvae_lib.faces`; fd_* are Fréchet distances in MTCNN O-net
# features, not FID): reference rates of real and blurred test images, then the generated means and samples.
FACE_REFERENCE_COLUMNS = ("face_rate_real", "face_rate_blur2", "fd_blur2")
FACE_COLUMNS = FACE_REFERENCE_COLUMNS + ("face_rate_means", "face_rate_samples", "fd_means", "fd_samples")
EXTRA_COLUMNS = ("correction_nll_bpd", "correction_rmse_uncond_maxvar", "correction_rmse_cond_maxvar", "span_angle_deg",
                 "val_recon_nll_bpd", "val_recon_nll_bpd_calibrated") + FACE_COLUMNS + (
                     "epochs_planned", "complete", "iwae_k", "num_images", "run")
# epochs is the number the evaluated checkpoint was trained for; complete is False when it is fewer than planned
# The Markdown table: the numbers behind the paper's claims, lowrank against diagonal.
MARKDOWN_COLUMNS = ("dataset", "head", "rank", "test_nll_bpd", "test_nll_bpd_calibrated", "residual_corr_samples",
                    "residual_corr_data", "span_capture", "real_inpaint_rmse_top_half",
                    "real_inpaint_rmse_top_half_train_mean", "real_inpaint_rmse_random50", "correction_rmse_uncond",
                    "correction_rmse_cond", "spectrum_dist_samples", "train_seconds")


def head_order(head: str) -> int:
    """Where rows of ``head`` go in the tables: the registered heads in their order (`sosvae_lib.heads.HeadSpec`),
    then the PPCA baseline (``pca``), then anything else."""
    last = max(head_spec(h).order for h in head_names())
    if head == "pca":
        return last + 1
    try:
        return head_spec(head).order
    except ValueError:  # a row of a head no longer registered (e.g. an old results file)
        return last + 2


def rows_from_eval(result: Mapping[str, Any], run: str = "") -> list[dict[str, Any]]:
    """The table rows of one `evaluate` result: the model's row, then the PPCA baseline's (if scored)."""
    model = {k: result.get(k) for k in COLUMNS + EXTRA_COLUMNS}
    model["run"] = run
    rows = [model]
    if "pca_test_nll_bpd" in result:
        pca = {k: result.get(f"pca_{k}") for k in COLUMNS + EXTRA_COLUMNS}
        pca.update(dataset=result.get("dataset"), head="pca", rank=result.get("pca_rank"), latent=None,
                   epochs=None, train_seconds=None, run=run)
        pca.update({k: result.get(k) for k in FACE_REFERENCE_COLUMNS})  # the same real test images
        rows.append(pca)
    return rows


def collect_rows(run_dirs: Iterable[str | os.PathLike] | str | os.PathLike, split: str = "test") -> list[dict]:
    """Rows from the evaluation on ``split`` of every run folder (a folder of runs or a list of run folders; runs
    not evaluated are skipped), deduplicated on (dataset, head, rank) and sorted by dataset, head
    (lowrank, lowrank-diag, diagonal, pca) and rank."""
    if isinstance(run_dirs, (str, os.PathLike)):
        root = Path(run_dirs)
        run_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    seen: dict[tuple, dict] = {}
    for d in run_dirs:
        run = Run(d)
        result = run.evaluation(split)
        if result is None:
            continue
        for row in rows_from_eval(result, run=run.folder.name):
            key = (row["dataset"], row["head"], row["rank"])
            seen.setdefault(key, row)
    return sorted(seen.values(), key=lambda r: (str(r["dataset"]), head_order(str(r["head"])),
                                                int(r["rank"] or 0)))


def format_cell(v: Any, digits: int = 4) -> str:
    """One table cell: ``digits`` significant digits, trailing zeros kept (6.99991 → "7.000", so a rounded value
    never looks like an exact one), scientific notation outside [1e-3, 1e5)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:#.{digits}g}".rstrip(".")
    return str(v)


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS + EXTRA_COLUMNS) -> str:
    """CSV text of ``rows`` with ``columns`` (full precision; empty cells for missing values)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return out.getvalue()


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = MARKDOWN_COLUMNS) -> str:
    """A GitHub Markdown table of ``rows`` with ``columns`` (4 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(format_cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[Mapping[str, Any]], tables_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``metrics.csv`` (every column), ``metrics.md`` (the headline columns), ``metrics.json`` (the rows) and
    ``real_inpainting.md`` (`real_inpainting_rows`) into ``tables_dir`` atomically; returns their paths."""
    tables_dir = Path(tables_dir)
    paths = {"csv": tables_dir / "metrics.csv", "md": tables_dir / "metrics.md", "json": tables_dir / "metrics.json",
             "real_inpainting": tables_dir / "real_inpainting.md"}
    atomic_write_text(paths["csv"], to_csv(rows))
    atomic_write_text(paths["md"], to_markdown(rows))
    atomic_write_text(paths["real_inpainting"], to_markdown(real_inpainting_rows(rows), REAL_INPAINT_TABLE_COLUMNS))
    atomic_write_text(paths["json"], json.dumps(list(rows), indent=1, default=str) + "\n")
    return paths


REAL_INPAINT_TABLE_COLUMNS = ("dataset", "mask", "lowrank", "pca", "diagonal", "train_mean", "beats_pca",
                              "beats_train_mean")


def real_inpainting_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Real inpainting (`sosvae_lib.inpaint`; the hidden pixels never reach a model) per dataset and mask family:
    the RMSE on the hidden pixels of the dataset's headline lowrank run (`headline`), of the PPCA of its rank, of
    the pixel-wise model and of the training mean, and whether the lowrank one is strictly lower than PPCA's and
    than the training mean's (None where a number is missing)."""
    out = []
    for ds, entry in headline(rows).items():
        if "lowrank" not in entry:
            continue
        for family in REAL_INPAINT_FAMILIES:
            key = f"real_inpaint_rmse_{family}"

            def get(model: str, k: str = key) -> Any:
                v = entry.get(model, {}).get(k)
                return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

            low, pca, floor = get("lowrank"), get("pca"), get("lowrank", f"{key}_train_mean")
            out.append(dict(dataset=ds, mask=family, lowrank=low, pca=pca, diagonal=get("diagonal"),
                            train_mean=floor,
                            beats_pca=None if low is None or pca is None else bool(low < pca),
                            beats_train_mean=None if low is None or floor is None else bool(low < floor)))
    return out


def headline(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each dataset: the lowrank run of the largest rank, the diagonal run and the PPCA baseline of that rank,
    as {dataset: {"lowrank": row, "diagonal": row, "pca": row}} (missing entries left out)."""
    out: dict[str, dict[str, Any]] = {}
    for ds in sorted({str(r["dataset"]) for r in rows}):
        mine = [r for r in rows if str(r["dataset"]) == ds]
        low = [r for r in mine if r["head"] == "lowrank"]
        entry: dict[str, Any] = {}
        if low:
            entry["lowrank"] = max(low, key=lambda r: int(r["rank"]))
            pca = [r for r in mine if r["head"] == "pca" and r["rank"] == entry["lowrank"]["rank"]]
            if pca:
                entry["pca"] = pca[0]
        diag = [r for r in mine if r["head"] == "diagonal"]
        if diag:
            entry["diagonal"] = diag[0]
        out[ds] = entry
    return out
