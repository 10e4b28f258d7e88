"""The checkpoint format and the training lock of SOS-VAE training (Langley et al., TMLR 2022).

Every file the project writes is written atomically (`sosvae_lib._io.atomic_write_bytes`: a temporary file in the
same folder, then `os.replace`), so a run killed at any moment leaves either the previous or the new version.

A checkpoint is a dict with ``"model"``, ``"optimizer"``, ``"lambda"``, ``"lambda_entropy"``, ``"rng"``,
``"epoch"`` (completed epochs), ``"config"``, ``"image_shape"``, ``"history"`` (per-epoch metric rows),
``"train_seconds"``, ``"weights_sha256"`` and ``"optimizer_sha256"``. This module reads and writes one file of a
given path; the names and layout of a run folder belong to `sosvae_lib.runs`.

Integrity: `torch.load` reads a checkpoint whose tensor bytes were altered without a word, so every checkpoint
carries the SHA-256 of its model and optimizer tensors (`tensor_digest`) and `load_checkpoint` recomputes them:
a truncated, empty, corrupt or altered file is one `CheckpointError` naming it, before any weights are used.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path
from typing import Any, Iterator

import torch

# The atomic writes and the digest live in the bottom layer `sosvae_lib._io`; re-exported for older imports.
from ._io import atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text, tensor_digest  # noqa: F401


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: empty, truncated, corrupt, altered, or not a sosvae checkpoint."""


class RunLockedError(FileExistsError):
    """Another training process holds the run directory's lock."""


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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, verify: bool = True,
                    own: bool = True) -> dict:
    """The checkpoint dict in the file ``path``, verified against its stored digests (``verify``; without it the
    tensors are memory-mapped and not read, for the epoch, config or history only). Raises FileNotFoundError when
    there is none, `CheckpointError` (a ValueError) naming the file when it is empty, truncated, corrupt, altered
    or not a training checkpoint. ``own``: the file is a run's own checkpoint, so a damaged one is advised to be
    deleted (the run then starts again); a file a user named as a checkpoint is most likely not one at all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run_dir: no checkpoint at {path}; train a run there first")
    advice = ("delete it to start the run again, or restore a good copy" if own
              else "give a run folder (the --out of a training) or its checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint: {path} is empty (0 bytes); {advice}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=not verify)
    except Exception as err:  # noqa: BLE001 — zip, pickle and storage errors all mean the same to the user
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}"
        what = "is truncated or corrupt" if own else "is not a checkpoint"
        raise CheckpointError(f"checkpoint: {path} {what} ({detail}); {advice}") from None
    required = ("model", "optimizer", "epoch", "config", "image_shape", "history")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint: {path} is not a sosvae training checkpoint (missing {', '.join(missing)}); "
                              f"{advice}")
    for key, part in (("weights_sha256", "model"), ("optimizer_sha256", "optimizer")):
        if verify and key in state and tensor_digest(state[part]) != state[key]:
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


def _stale_temporaries(run_dir: Path, guarded: tuple[str, ...]) -> list[Path]:
    """The temporaries `atomic_write_bytes` leaves of the files ``guarded`` when their writer is killed mid-write."""
    return sorted(p for name in guarded for p in run_dir.glob(f".{name}.*.tmp") if p.is_file())


@contextlib.contextmanager
def run_lock(lock_path: str | os.PathLike, guarded: tuple[str, ...] = ()) -> Iterator[Path]:
    """Hold the lock file ``lock_path`` (creating its folder) for the duration of the block, so that two trainings
    never write one run folder (`sosvae_lib.runs.Run.lock` names the file). The lock is an advisory `flock`: the
    kernel drops it when the process ends, however it ends, so a killed run never leaves it stuck (the file itself
    stays, unlocked). Raises `RunLockedError` naming the folder and the holder's pid when another process holds it.

    On taking the lock, the temporaries of the files named in ``guarded`` (those only a lock holder writes) left by
    a writer killed mid-write are deleted (the lock proves that no live training is writing them). On leaving, if
    the folder holds nothing but the lock file (the block failed before writing anything, e.g. a usage error found
    while building the model), the lock file and the folders this call created are removed, so a refused run
    leaves no trace. The lock file is unlinked while still locked; a process that opened it just before then sees,
    once it holds the lock, that the path no longer names the file it locked, and starts again on the new one.
    """
    import fcntl

    lock_path = Path(lock_path)
    run_dir = lock_path.parent
    first_existing = run_dir
    while not first_existing.exists() and first_existing != first_existing.parent:
        first_existing = first_existing.parent
    fd = _take_lock(lock_path)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for tmp in _stale_temporaries(run_dir, guarded):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        try:
            yield run_dir
        finally:
            _remove_if_untouched(lock_path, first_existing)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _take_lock(lock_path: Path) -> int:
    """The descriptor of ``lock_path`` (created, with its folder), exclusively `flock`-ed by this process; the file
    the path names when the lock is taken (see `run_lock`). `RunLockedError` when another process holds it."""
    import fcntl

    run_dir = lock_path.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a refused run that held the lock removed the folder it had created
            run_dir.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"out: {run_dir} is being written by another training (pid {holder}); wait for it "
                                 f"to finish, or choose another --out") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed the file we opened: lock the one the path names now


def _remove_if_untouched(lock_path: Path, first_existing: Path) -> None:
    """If the lock's folder holds nothing but the lock file, remove it and the folders below ``first_existing``
    (those `run_lock` created), each only if empty: never what another process put there meanwhile."""
    left: list[str] = []
    with contextlib.suppress(OSError):
        left = [p.name for p in lock_path.parent.iterdir()]
    if left != [lock_path.name]:
        return
    with contextlib.suppress(FileNotFoundError):
        lock_path.unlink()
    folder = lock_path.parent
    while folder != first_existing and folder != folder.parent:
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent
