"""Atomic file writes and tensor digests (the bottom layer of sosvae_lib: imports nothing of the package).

Every file the project writes is written atomically (a temporary file in the same folder, then `os.replace`), so
a process killed at any moment leaves either the previous or the new version, never a torn one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

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

