"""Argument checks shared by every entry point of sosvae_lib (the bottom layer: imports nothing of the package).

Each check returns the value (normalised where stated) or raises one ``ValueError`` whose message starts with the
parameter's name and states what is allowed: ``"<name>: must be ..., got <value>"``. Configuration fields,
function options, notebook parameters and command-line flags all go through these, so a bad value reads the same
wherever it is given.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

PRECISIONS = ("auto", "fp32", "bf16")
"""Precision of the encoder and trunk (`sosvae_lib.config.TrainConfig.precision`): ``auto`` = bf16 on a CUDA device
that supports it, fp32 elsewhere."""

DEVICES = ("auto", "cpu", "cuda")
"""Device names (besides ``cuda:N``) every entry point accepts (`sosvae_lib.devices.resolve_device`)."""

MAX_IMAGE_SIDE = 4096


def fail(name: str, message: str) -> None:
    """Raise ``ValueError("<name>: <message>")``."""
    raise ValueError(f"{name}: {message}")


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> Any:
    """Return ``value`` if it is an int (not a bool) >= ``minimum`` (or None when ``allow_none``); otherwise raise
    ``ValueError("<name>: must be an integer >= <minimum>[ or None], got <value>")``. The one integer check of
    every option and field in the package."""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(name, f"must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_float(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False,
                allow_none: bool = False) -> Any:
    """Return ``value`` if it is a finite real number (not a bool; > 0 with ``positive``, >= 0 with
    ``nonnegative``; None allowed with ``allow_none``), else one ValueError naming ``name``."""
    if value is None and allow_none:
        return value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive and value <= 0:
        ok = False
    if ok and nonnegative and value < 0:
        ok = False
    if not ok:
        what = "a finite number" + (" > 0" if positive else " >= 0" if nonnegative else "")
        fail(name, f"must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_bool(name: str, value: Any, allow_none: bool = False) -> Any:
    """Return ``value`` if it is True or False (or None with ``allow_none``), else one ValueError naming ``name``."""
    if (value is None and allow_none) or isinstance(value, bool):
        return value
    fail(name, f"must be {'True, False or None' if allow_none else 'True or False'}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else ``ValueError("<name>: must be one of a, b, c, got ...")``."""
    choices = tuple(choices)
    if not any(type(value) is type(c) and value == c for c in choices):
        fail(name, f"must be one of {', '.join(str(c) for c in choices)}, got {value!r}")
    return value


def check_mapping(name: str, value: Any, example: str) -> dict[str, Any]:
    """``value`` as a dict if it is a mapping with string keys; otherwise one ValueError naming the parameter.
    For notebook parameters: ``papermill -p NAME "a=1"`` passes a string, ``-y "NAME: {a: 1}"`` a mapping."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        fail(name, f"must be a dict of names to values, e.g. {example} (with papermill: -y \"{name}: "
                   f"{example.replace(chr(34), '')}\"), got the {type(value).__name__} {value!r}")
    return dict(value)


def check_device(name: str, value: Any) -> str:
    """Return ``value`` if it is a device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N digits); whether that
    device exists is `sosvae_lib.devices.resolve_device`'s question."""
    if not isinstance(value, str) or not (value in DEVICES or value.startswith("cuda:") and value[5:].isdigit()):
        fail(name, f"must be one of {', '.join(DEVICES)} or 'cuda:N', got {value!r}")
    return value


def check_precision(name: str, value: Any) -> str:
    """Return ``value`` if it is one of `PRECISIONS`."""
    return check_choice(name, value, PRECISIONS)


def check_image_size(value: Any, name: str = "image_size", *, text: bool = False) -> int | tuple[int, int] | None:
    """An image size in the form it is stored (`sosvae_lib.config.TrainConfig.image_size`): an int side for a
    square, an (H, W) tuple, or None (the dataset's default). Accepts an int, a pair (tuple or list, as JSON gives
    it), None, and with ``text`` a string as typed on a command line: ``"64"`` → 64, ``"218x178"`` → (218, 178)
    (elsewhere a string is an error: ``"64"`` is more likely a mistake than a size). Every side is an
    integer in [1, `MAX_IMAGE_SIDE`]. The one parser of image sizes: config, data loading and the CLIs use it."""
    if value is None:
        return None
    given = value
    if isinstance(value, str) and text:
        parts = value.strip().lower().replace("×", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 2):
            fail(name, f"must be PX or HxW (e.g. 64 or 218x178), got {given!r}")
        value = values[0] if len(values) == 1 else tuple(values)
    if isinstance(value, (list, tuple)):
        pair = tuple(value)
        if len(pair) != 2:
            pair = ()
    else:
        pair = (value, value)
    if not pair or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in pair):
        fail(name, f"must be a positive int, a pair (H, W) of positive ints, or None, got {given!r}")
    if max(pair) > MAX_IMAGE_SIDE:
        fail(name, f"at most {MAX_IMAGE_SIDE} pixels per side, got {given!r}")
    if isinstance(value, (list, tuple)):
        return int(pair[0]), int(pair[1])
    return int(value)


def image_hw(image_size: Any, name: str = "image_size") -> tuple[int, int] | None:
    """(H, W) of an image size (any form `check_image_size` accepts), or None for the dataset's default."""
    size = check_image_size(image_size, name)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else size
