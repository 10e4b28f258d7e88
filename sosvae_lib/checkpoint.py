"""Run directories and checkpoints of SOS-VAE training (Langley et al., TMLR 2022).

Every file of a run is written atomically (a temporary file in the same folder, then `os.replace`), so a run
killed at any moment leaves either the previous or the new version, never a torn one.

Run directory: ``config.json``, ``checkpoint.pt`` (dict with ``"model"``, ``"optimizer"``, ``"lambda"``,
``"lambda_entropy"``, ``"rng"``, ``"epoch"`` (completed epochs), ``"config"``, ``"image_shape"``, ``"history"``
(per-epoch metric rows), ``"train_seconds"``, ``"weights_sha256"`` and ``"optimizer_sha256"``), ``metrics.csv``,
``summary.json`` (when finished), ``tb/``, and ``train.lock`` (held while a training writes the folder; see
`run_lock`).

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
    # A run's own checkpoint.pt that cannot be read is damaged (deleting it restarts the run); any other file the
    # caller named is most likely not a checkpoint at all, and deleting it is not the advice to give.
    own = path.name == CHECKPOINT
    advice = ("delete it to start the run again, or restore a good copy" if own
              else f"give a run folder (the --out of a training) or its {CHECKPOINT}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint: {path} is empty (0 bytes); {advice}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
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


# The files only a training holding the run lock writes: a temporary of one of these found by the next lock holder
# is the leftover of a writer that was killed mid-write (other files of the folder, such as an evaluation's, are
# written without the lock, so their temporaries may belong to a live writer and are left alone).
TRAINER_FILES = (CHECKPOINT, CONFIG, METRICS, SUMMARY)


def _stale_temporaries(run_dir: Path) -> list[Path]:
    """The temporaries `atomic_write_bytes` leaves of `TRAINER_FILES` when its writer is killed mid-write."""
    return sorted(p for name in TRAINER_FILES for p in run_dir.glob(f".{name}.*.tmp") if p.is_file())


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``run_dir/train.lock`` (creating the folder) for the duration of the block, so that two trainings
    never write one run directory. The lock is an advisory `flock`: the kernel drops it when the process ends,
    however it ends, so a killed run never leaves it stuck (the file itself stays, unlocked). Raises
    `RunLockedError` naming the folder and the holder's pid when another process holds it.

    On taking the lock, the temporaries of `TRAINER_FILES` left by a writer killed mid-write are deleted (the lock
    proves that no live training is writing them). On leaving, if the folder holds nothing but the lock file (the
    block failed before writing anything, e.g. a usage error found while building the model), the lock file and
    the folders this call created are removed, so a refused run leaves no trace. The lock file is unlinked while
    still locked; a process that opened it just before then sees, once it holds the lock, that the path no longer
    names the file it locked, and starts again on the new one.
    """
    import fcntl

    run_dir = Path(run_dir)
    first_existing = run_dir
    while not first_existing.exists() and first_existing != first_existing.parent:
        first_existing = first_existing.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK
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
            break
        os.close(fd)  # the previous holder removed the file we opened: lock the one the path names now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for tmp in _stale_temporaries(run_dir):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        try:
            yield run_dir
        finally:
            left: list[str] = []
            with contextlib.suppress(OSError):
                left = [p.name for p in run_dir.iterdir()]
            if left == [LOCK]:
                with contextlib.suppress(FileNotFoundError):
                    lock_path.unlink()
                folder = run_dir
                while folder != first_existing and folder != folder.parent:
                    try:
                        folder.rmdir()  # only if empty: never removes what another process put there meanwhile
                    except OSError:
                        break
                    folder = folder.parent
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def resolve_root(root: str | None, run_dir: str | os.PathLike) -> str | None:
    """The data root of the run in ``run_dir`` as an absolute path (None stays None: the dataset's default).

    `sosvae_lib.train.train` stores roots absolute (`os.path.abspath` after `~` expansion, so a run can be
    evaluated from any folder). A run trained before that stores the root as it was typed, relative to the folder
    the training was started from, which is not recorded; it is looked for, in order, in the current folder (where
    it was read before) and in each folder above ``run_dir`` (the project folder of the usual ``runs/NAME``
    layout); the first that holds it is taken. If none does, the path relative to the current folder is returned,
    and the data loader's error names it.
    """
    if root is None:
        return None
    path = Path(os.path.expanduser(root))
    if path.is_absolute():
        return os.path.abspath(path)
    for base in (Path.cwd(), *Path(os.path.abspath(run_dir)).parents):
        if (base / path).exists():
            return os.path.abspath(base / path)
    return os.path.abspath(path)


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, TrainConfig) of the run saved in ``run_dir`` (a run folder, or its
    ``checkpoint.pt``); the configuration's ``root`` is absolute (`resolve_root`). Another file is a
    NotADirectoryError naming it; a missing or damaged checkpoint, see `load_checkpoint`."""
    from .config import TrainConfig
    from .model import build_model

    run_dir = Path(run_dir)
    if run_dir.is_file():
        if run_dir.name != CHECKPOINT:
            raise NotADirectoryError(f"run_dir: {run_dir} is a file, not a run folder; give the --out folder of a "
                                     f"training run")
        run_dir = run_dir.parent
    ckpt = load_checkpoint(run_dir, map_location="cpu")  # verified: altered weights never reach a model
    config = TrainConfig.from_dict(ckpt["config"])
    if config.root is not None:
        config = config.replace(root=resolve_root(config.root, run_dir))
    model = build_model(config, tuple(ckpt["image_shape"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config
