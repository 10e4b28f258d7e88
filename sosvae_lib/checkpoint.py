"""Run directories and checkpoints of SOS-VAE training (Langley et al., TMLR 2022).

Every file of a run is written atomically (a temporary file in the same folder, then `os.replace`), so a run
killed at any moment leaves either the previous or the new version, never a torn one.

Run directory: ``config.json``, ``checkpoint.pt`` (dict with ``"model"``, ``"optimizer"``, ``"lambda"``,
``"lambda_entropy"``, ``"rng"``, ``"epoch"`` (completed epochs), ``"config"``, ``"image_shape"``, ``"history"``
(per-epoch metric rows), ``"train_seconds"``, ``"weights_sha256"`` and ``"optimizer_sha256"``), ``metrics.csv``,
``summary.json`` (when finished), ``tb/``, and ``train.lock`` (held while a training writes the folder).

Integrity: `torch.load` reads a checkpoint whose tensor bytes were altered without a word, so every checkpoint
carries the SHA-256 of its model and optimizer tensors (`tensor_digest`) and `load_checkpoint` recomputes them:
a truncated, empty, corrupt or altered file is one `CheckpointError` naming it, before any weights are used.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
LOCK = "train.lock"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: empty, truncated, corrupt, altered, or not a sosvae checkpoint."""


class RunLockedError(FileExistsError):
    """Another training process holds the run directory's lock."""


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


def tensor_digest(obj: Any) -> str:
    """SHA-256 of every tensor in ``obj`` (a tensor, or dicts / lists / tuples of them, walked in sorted-key
    order) together with its name path, dtype and shape; other leaves are ignored. Equal digests mean bitwise
    equal tensors (used to compare weights across runs and processes, and to detect altered checkpoints)."""
    h = hashlib.sha256()

    def walk(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                walk(f"{name}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{name}/{i}", v)

    walk("", obj)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict at ``path`` (a run directory or the file itself), verified against its stored
    digests. Raises FileNotFoundError when there is none, `CheckpointError` (a ValueError) naming the file when it
    is empty, truncated, corrupt, altered or not a training checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"run_dir: no checkpoint at {path}; train a run there first")
    advice = "delete it to start the run again, or restore a good copy"
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint: {path} is empty (0 bytes); {advice}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 — zip, pickle and storage errors all mean the same to the user
        raise CheckpointError(f"checkpoint: {path} is truncated or corrupt ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'}); {advice}") from None
    required = ("model", "optimizer", "epoch", "config", "image_shape", "history")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint: {path} is not a sosvae training checkpoint (missing {', '.join(missing)}); "
                              f"{advice}")
    for key, part in (("weights_sha256", "model"), ("optimizer_sha256", "optimizer")):
        if key in state and tensor_digest(state[part]) != state[key]:
            raise CheckpointError(f"checkpoint: {path} was altered or damaged: its {part} tensors do not match the "
                                  f"SHA-256 stored with them; {advice}")
    return state


def check_out_dir(path: str | os.PathLike, name: str = "out") -> Path:
    """``path`` as a Path if it is, or can be created as, a writable directory; otherwise one error naming it
    (NotADirectoryError: it or an ancestor is a file; PermissionError: the nearest existing folder is not
    writable by this process). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{name}: {path} is a file, not a directory; give a folder for the run")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{name}: {path} lies under {existing}, which is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise PermissionError(f"{name}: {path} is not writable ({existing} does not allow this user to write); "
                              f"choose another folder or fix its permissions")
    return path


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``run_dir/train.lock`` (creating the folder) for the duration of the block, so that two trainings
    never write one run directory. The lock is an advisory `flock`: the kernel drops it when the process ends,
    however it ends, so a killed run never leaves it stuck (the file itself stays, unlocked). Raises
    `RunLockedError` naming the folder and the holder's pid when another process holds it."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(f"out: {run_dir} is being written by another training (pid {holder}); wait for it "
                                 f"to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield run_dir
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, TrainConfig) of the run saved in ``run_dir``."""
    from .config import TrainConfig
    from .model import build_model

    ckpt = load_checkpoint(run_dir, map_location="cpu")  # verified: altered weights never reach a model
    config = TrainConfig.from_dict(ckpt["config"])
    model = build_model(config, tuple(ckpt["image_shape"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config
