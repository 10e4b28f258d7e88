"""The run folder of SOS-VAE training (Langley et al., "Structured Uncertainty in the Observation Space of
Variational Autoencoders", TMLR 2022): one object, `Run`, owns its file names and everything read from it.

Layout of a run folder (every file written atomically, `sosvae_lib._io.atomic_write_bytes`)::

    config.json        the TrainConfig of the training (written when it starts, so a run killed in its first
                       epoch can be resumed)
    checkpoint.pt      weights, optimiser, multipliers, history, config and digests after the last finished epoch
                       (`sosvae_lib.checkpoint` holds the format)
    metrics.csv        one row per epoch (`Run.history`)
    summary.json       written when the training finished (`Run.summary`)
    tb/                TensorBoard scalars
    train.lock         held while a training writes the folder (`Run.lock`)
    calibration.json   the fitted diagonal scale (`Run.calibration`), written by `sosvae_lib.evaluate`
    eval_<split>.json  the evaluation results (`Run.evaluation`)

Nothing else in the package spells these names: train, evaluate, the editor, reproduce and the notebooks ask a
`Run` (``run.load_model()``, ``run.dataset("test")``, ``run.calibration()``). The data of a run is the dataset,
size and root it was trained on; its root is stored absolute by the trainer (`resolve_root` finds the root of a
run trained before that). "Train unless already trained" needs the trainer, above this module:
`sosvae_lib.train.ensure_trained`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from . import checkpoint as ckpt_io
from .calibration import Calibration, check_calibration_record
from .config import RESUMABLE_FIELDS, TrainConfig

__all__ = ["Run", "SPLITS", "STATES", "bpd_bits", "config_dataset", "data_bits", "resolve_root", "stack_images"]

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "train.lock"
CALIBRATION_FILE = "calibration.json"
TENSORBOARD_DIR = "tb"
SPLITS = ("train", "val", "test")
STATES = ("absent", "partial", "complete", "stale")
# The files only a training holding the lock writes (see `sosvae_lib.checkpoint.run_lock`): a temporary of one of
# them found by the next lock holder is the leftover of a killed writer. An evaluation's files are written without
# the lock, so their temporaries may belong to a live writer and are left alone.
TRAINER_FILES = (CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)


def data_bits(dataset: Any) -> int | None:
    """The one answer to "is this quantised data, and at how many bits?": ``dataset.bits`` (8 for uint8 images,
    16 for 16-bit ones, None for continuous data such as ``synthetic``). Training dequantises at these bits, and
    evaluation and calibration score at them (`sosvae_lib.metrics.bits_per_dim` with ``bits=bits or 8``)."""
    bits = getattr(dataset, "bits", None)
    if bits is not None and bits not in (8, 16):
        raise ValueError(f"dataset: bits must be 8, 16 or None (continuous data), got {bits!r}")
    return bits


def bpd_bits(bits: int | None) -> int:
    """The quantisation bits per dimension are stated at (`sosvae_lib.metrics.bits_per_dim`'s ``bits``) for data of
    `data_bits` ``bits``: the data's own (8 or 16), and the 8-bit scale for continuous data (as `sosvae_lib.metrics`
    states). Dequantised or not, training, evaluation and calibration use it."""
    return 8 if bits is None else bits


def config_dataset(config: TrainConfig, split: str, n: int | None = None, *, root: str | os.PathLike | None = None,
                   **options: Any):
    """The dataset ``config`` trains on (its name, image size and root; ``root`` replaces the root), on ``split``,
    its first ``n`` items (None: all; the data set's deterministic ``max_items`` subset). ``options`` go to
    `sosvae_lib.data.load_dataset`. The one place a run's data is built from its configuration."""
    from .data import load_dataset

    if n is not None:
        options["max_items"] = n
    return load_dataset(config.dataset, split, image_size=config.image_size,
                        root=config.root if root is None else str(root), **options)


def stack_images(dataset: Any, limit: int | None = None) -> torch.Tensor:
    """The first ``limit`` items of a dataset (None: all) as one float tensor [N, C, H, W]; a ValueError naming the
    split when there are none."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = []
    for i in range(n):
        item = dataset[i]
        items.append(item[0] if isinstance(item, (list, tuple)) else item)
    if not items:
        raise ValueError("split: the data set has no images in this split")
    return torch.stack(items).float()


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


def _read_json(path: Path, what: str, advice: str) -> Any:
    """The JSON at ``path``, or None when there is none; a ValueError naming the file when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what}: {path} is not valid JSON ({err}); {advice}") from None


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class Run:
    """The run folder ``folder`` (a path; a path to its ``checkpoint.pt`` names the same run). The constructor
    touches no file; each method reads or writes what it says. A `Run` given where a folder is expected is taken
    as it is, so ``Run(run)`` is ``run``'s folder."""

    def __init__(self, folder: "str | os.PathLike | Run"):
        if isinstance(folder, Run):
            folder = folder.folder
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"run_dir: must be a run folder (str or Path), got {type(folder).__name__}")
        path = Path(folder)
        self.folder = path.parent if path.name == CHECKPOINT_FILE else path

    def __repr__(self) -> str:
        return f"Run({str(self.folder)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and os.path.abspath(self.folder) == os.path.abspath(other.folder)

    def __hash__(self) -> int:
        return hash(os.path.abspath(self.folder))

    # -- file names --------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.folder / SUMMARY_FILE

    @property
    def lock_path(self) -> Path:
        return self.folder / LOCK_FILE

    @property
    def calibration_path(self) -> Path:
        return self.folder / CALIBRATION_FILE

    @property
    def tensorboard_path(self) -> Path:
        return self.folder / TENSORBOARD_DIR

    def eval_path(self, split: str = "test") -> Path:
        """The file of the evaluation results on ``split`` (``eval_<split>.json``)."""
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
        return self.folder / f"eval_{split}.json"

    def files(self) -> list[Path]:
        """The files a figure of this run depends on (weights, evaluation, calibration), present or not: a
        notebook executed after all of them were last written is up to date."""
        return [self.checkpoint_path, self.eval_path("test"), self.calibration_path]

    # -- the training's files ----------------------------------------------------------------------------------
    def exists(self) -> bool:
        """A checkpoint is there (at least one epoch finished)."""
        return self.checkpoint_path.is_file()

    def started(self) -> bool:
        """A training wrote into the folder (a checkpoint, or the configuration a killed first epoch leaves)."""
        return self.checkpoint_path.is_file() or self.config_path.is_file()

    def _check_folder(self) -> None:
        if self.folder.is_file():
            raise NotADirectoryError(f"run_dir: {self.folder} is a file, not a run folder; give the --out folder of "
                                     f"a training run")

    def checkpoint(self, map_location: str | torch.device = "cpu", verify: bool = True) -> dict:
        """The checkpoint dict, its tensors verified against their digests (``verify``; without it the tensors are
        memory-mapped, not read: for the epoch, history and config). Missing: FileNotFoundError naming the folder;
        damaged: `sosvae_lib.checkpoint.CheckpointError` naming the file."""
        self._check_folder()
        if not self.checkpoint_path.is_file():
            raise FileNotFoundError(f"run_dir: no checkpoint in {self.folder}; train a run there first "
                                    f"(python -m sosvae_lib.train --out {self.folder})")
        return ckpt_io.load_checkpoint(self.checkpoint_path, map_location=map_location, verify=verify)

    def write_checkpoint(self, state: dict) -> None:
        ckpt_io.atomic_save(state, self.checkpoint_path)

    def stored_config(self) -> TrainConfig:
        """The configuration as stored (its root as stored): the checkpoint's, or for a run killed before its first
        checkpoint its ``config.json``. FileNotFoundError when the folder holds neither; a ValueError naming the
        file that cannot be used."""
        self._check_folder()
        if self.checkpoint_path.is_file():
            return TrainConfig.from_dict(self.checkpoint(verify=False)["config"])
        if not self.config_path.is_file():
            raise FileNotFoundError(f"run_dir: {self.folder} holds no run (no {CHECKPOINT_FILE} or {CONFIG_FILE}); "
                                    f"train one there first")
        try:
            return TrainConfig.from_dict(json.loads(self.config_path.read_text()))
        except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError; a non-dict is a TypeError
            raise ValueError(f"config: {self.config_path} is not a usable run configuration ({err}); delete the "
                             f"folder to start the run again") from None

    @property
    def config(self) -> TrainConfig:
        """The stored configuration (`stored_config`) with its ``root`` absolute (`resolve_root`)."""
        config = self.stored_config()
        return config if config.root is None else config.replace(root=resolve_root(config.root, self.folder))

    def write_config(self, config: TrainConfig) -> None:
        ckpt_io.atomic_write_json(self.config_path, config.to_dict())

    def epochs_done(self) -> int:
        """The epochs the checkpoint was trained for (0 without one)."""
        return int(self.checkpoint(verify=False)["epoch"]) if self.exists() else 0

    def state(self, config: TrainConfig | None = None) -> str:
        """``absent`` (no checkpoint), ``complete`` (finished: ``summary.json`` says so and the checkpoint reached
        the planned epochs), ``partial`` (a checkpoint to resume) or ``stale`` (not a run of ``config``).

        Stale is exactly what ``train --resume`` with ``config`` would refuse: a field outside
        `sosvae_lib.config.RESUMABLE_FIELDS` that differs, or more epochs trained than ``config.epochs``. So a run
        that training would resume is never called stale (and never deleted for it). A checkpoint that cannot be
        read is ``partial``: resuming it stops with the error that names the file."""
        if not self.exists():
            return "absent"
        try:
            state = self.checkpoint(verify=False)
        except ckpt_io.CheckpointError:  # resuming it names the damage (and what to do) with the file
            return "partial"
        stored, done = TrainConfig.from_dict(state["config"]), int(state["epoch"])
        if config is not None:
            a, b = stored.to_dict(), config.to_dict()
            if any(a[k] != b[k] for k in b if k not in RESUMABLE_FIELDS) or done > config.epochs:
                return "stale"
        summary = self.summary()
        planned = stored.epochs if config is None else config.epochs
        if isinstance(summary, dict) and summary.get("complete") and done == planned:
            return "complete"
        return "partial"

    def load_model(self, device: str | torch.device = "cpu"):
        """The trained `sosvae_lib.model.VAE` in eval mode on ``device``, from the verified checkpoint (altered
        weights never reach a model)."""
        from .model import build_model

        state = self.checkpoint(map_location="cpu")
        model = build_model(TrainConfig.from_dict(state["config"]), tuple(state["image_shape"]))
        model.load_state_dict(state["model"])
        return model.to(device).eval()

    @contextlib.contextmanager
    def lock(self) -> Iterator["Run"]:
        """Hold the folder's training lock for the block (`sosvae_lib.checkpoint.run_lock`, creating the folder):
        `sosvae_lib.checkpoint.RunLockedError` when another process holds it."""
        with ckpt_io.run_lock(self.lock_path, TRAINER_FILES):
            yield self

    def history(self) -> list[dict[str, float]]:
        """The per-epoch rows of ``metrics.csv`` as dicts of floats (NaN where a row has no value)."""
        if not self.metrics_path.is_file():
            raise FileNotFoundError(f"run_dir: no {METRICS_FILE} in {self.folder}; train a run there first")
        with self.metrics_path.open(newline="") as f:
            return [{k: _float(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        ckpt_io.write_metrics_csv(self.metrics_path, rows)

    def summary(self) -> dict | None:
        """``summary.json`` (None when the training has not finished)."""
        return _read_json(self.summary_path, "summary", "delete it and resume the run to write it again")

    def write_summary(self, summary: dict[str, Any]) -> None:
        ckpt_io.atomic_write_json(self.summary_path, summary)

    # -- data ---------------------------------------------------------------------------------------------------
    def dataset(self, split: str, n: int | None = None, *, root: str | os.PathLike | None = None, **options: Any):
        """The run's dataset (its name, image size and root) on ``split``, its first ``n`` items (None: all; the
        data set's deterministic ``max_items`` subset). ``root`` replaces the stored one (data that moved);
        ``options`` go to `sosvae_lib.data.load_dataset`."""
        return config_dataset(self.config, split, n, root=root, **options)

    def images(self, split: str, n: int | None = None, *, root: str | os.PathLike | None = None) -> torch.Tensor:
        """The first ``n`` images of ``split`` (`dataset`) as float [N, C, H, W] in [0, 1], never flipped (the
        training set as stored, e.g. for its mean or a PPCA fit; training draws its own flips)."""
        return stack_images(self.dataset(split, n, root=root, augment=False), n)

    @property
    def bits(self) -> int | None:
        """`data_bits` of the run's training set (as trained: its ``max_items`` subset): 8, 16, or None for
        continuous data. Training dequantised at these bits; evaluation and calibration score at them."""
        return self.data_bits()

    def data_bits(self, root: str | os.PathLike | None = None) -> int | None:
        """`bits`, with the data read from ``root`` (None: the stored root; give it when the data moved)."""
        return data_bits(self.dataset("train", self.config.max_items, root=root, augment=False))

    # -- results ------------------------------------------------------------------------------------------------
    def calibration(self) -> Calibration | None:
        """The stored `sosvae_lib.calibration.Calibration` (None when there is none). A file that is not such a
        record (corrupt JSON, missing fields, a scale that is not a number > 0) is a ValueError naming it."""
        advice = "delete it, or write it again with sosvae_lib.evaluate"
        record = _read_json(self.calibration_path, "calibration", advice)
        return None if record is None else check_calibration_record(record, str(self.calibration_path), advice)

    def write_calibration(self, calibration: Calibration, **meta: Any) -> None:
        """Store ``calibration`` with ``meta`` (e.g. ``split="val", seed=0``) beside its fields."""
        if not isinstance(calibration, Calibration):
            raise TypeError(f"calibration: must be a Calibration, got {type(calibration).__name__}")
        ckpt_io.atomic_write_json(self.calibration_path, dict(calibration.to_dict(), **meta))

    def evaluation(self, split: str = "test") -> dict | None:
        """The stored evaluation results on ``split`` (None when there are none)."""
        return _read_json(self.eval_path(split), "evaluation", "delete it, or evaluate the run again")

    def write_evaluation(self, split: str, result: dict[str, Any]) -> None:
        ckpt_io.atomic_write_json(self.eval_path(split), result)

    def current_evaluation(self, split: str = "test", required: tuple[str, ...] = ()) -> dict | None:
        """The stored evaluation on ``split`` if it is current: written after the checkpoint and holding every key
        of ``required`` (e.g. the table's columns, which an evaluation by an older version may lack); else None."""
        path = self.eval_path(split)
        if not path.is_file() or not self.exists() or path.stat().st_mtime < self.checkpoint_path.stat().st_mtime:
            return None
        result = self.evaluation(split)
        return result if isinstance(result, dict) and all(k in result for k in required) else None
