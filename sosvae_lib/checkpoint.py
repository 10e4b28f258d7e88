"""Run directories and checkpoints of SOS-VAE training (Langley et al., TMLR 2022).

Every file of a run is written atomically (a temporary file in the same folder, then `os.replace`), so a run
killed at any moment leaves either the previous or the new version, never a torn one.

Run directory: ``config.json``, ``checkpoint.pt`` (dict with ``"model"``, ``"optimizer"``, ``"lambda"``,
``"lambda_entropy"``, ``"rng"``, ``"epoch"`` (completed epochs), ``"config"``, ``"image_shape"``, ``"history"``
(per-epoch metric rows), ``"train_seconds"``), ``metrics.csv``, ``summary.json`` (when finished), ``tb/``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.csv"
SUMMARY = "summary.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and `os.replace`, so readers see
    the old file or the whole new one, never a torn one (used for every file the project writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` ``obj`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_metrics_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write per-epoch metric rows (dicts; the union of their keys, in first-seen order) as CSV, atomically."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict at ``path`` (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"run_dir: no checkpoint at {path}; train a run there first")
    return torch.load(path, map_location=map_location, weights_only=False)


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, TrainConfig) of the run saved in ``run_dir``."""
    from .config import TrainConfig
    from .model import build_model

    ckpt = load_checkpoint(run_dir, map_location="cpu")
    config = TrainConfig.from_dict(ckpt["config"])
    model = build_model(config, tuple(ckpt["image_shape"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config
