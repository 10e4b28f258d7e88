"""Which device a process computes on: the one place that turns ``auto | cpu | cuda | cuda:N`` into a
`torch.device` and says, in one line, why CUDA cannot be used.

``auto`` means the GPU when CUDA works, else the CPU. A machine without an NVIDIA driver, or with a CPU-only torch,
or with every GPU hidden (``CUDA_VISIBLE_DEVICES=""``), is a CPU machine and ``auto`` picks the CPU silently. A GPU
machine where CUDA fails (a driver too old for the CUDA this torch was built for, a GPU this build has no kernels for,
…) is not: ``auto`` then still picks the CPU, so a notebook or a script keeps working, but prints one warning line
on stderr naming the problem (`cuda_problem`) before any work starts, so that hours of CPU training are never a
surprise. Give ``cpu`` to mean the CPU without the warning, or ``cuda`` to make an unusable CUDA an error.

Under ``torchrun`` each process takes the GPU of its ``LOCAL_RANK``: ``cuda`` (or ``auto``) is ``cuda:LOCAL_RANK``,
an error when the node has fewer GPUs than processes (two processes on one GPU would silently halve the speed and
double the memory); ``cuda:N`` names one GPU for every process and is refused when more than one process runs.
"""

from __future__ import annotations

import os
import sys

import torch

# What cuda_problem found, by kind: "build" (a CPU-only torch), "driver" (no NVIDIA driver), "hidden" (a driver but
# no visible device), "old" (a driver too old for this build) and "broken" (CUDA reports a device but a tensor cannot
# be made on it). The first three are CPU machines; the last two are GPU machines that CUDA cannot use.
_CPU_MACHINE = ("build", "driver", "hidden")


def _build() -> str:
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda
            else f"torch {torch.__version__} (a CPU-only build)")


def _first_sentence(text: str) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else "no message"
    return line.split(". ")[0].rstrip(".")


def _diagnose(index: int | None = None) -> tuple[str, str] | None:
    """None when a tensor can be made and read back on CUDA device ``index`` (None: the current one); else
    (kind, what was found)."""
    if not torch.cuda.is_available():
        if not torch.version.cuda:
            return "build", "no CUDA support compiled in"
        try:
            torch.cuda.init()  # is_available() hides the reason; initialising raises it
        except Exception as err:  # noqa: BLE001 — torch raises RuntimeError or AssertionError; the text says why
            text = str(err)
            low = text.lower()
            if "no nvidia driver" in low:
                return "driver", "no NVIDIA driver"
            if "too old" in low or "insufficient" in low:
                return "old", f"a driver too old for it ({_first_sentence(text)})"
            if "no cuda gpus" in low or "no cuda-capable device" in low:
                return "hidden", "a driver but no visible CUDA device"
            return "broken", f"CUDA failed to initialise ({_first_sentence(text)})"
        return "hidden", "no CUDA device (torch.cuda.is_available() is False)"
    device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    try:
        # A kernel and a read-back: a GPU without kernels for it, or a driver that cannot run this build's
        # runtime, fails only when something runs.
        float(torch.ones(1, device=device).add(1).sum())
    except Exception as err:  # noqa: BLE001 — any failure here means the device cannot be used
        return "broken", f"{device} unusable ({_first_sentence(err)})"
    return None


def cuda_problem(index: int | None = None) -> str | None:
    """None when CUDA works (a tensor can be made, computed on and read back on device ``index``, default the
    current one); else one line naming torch's CUDA version and what was found, e.g. ``CUDA is unusable: torch
    2.14.1+cu130 (CUDA 13.0) found no NVIDIA driver``."""
    found = _diagnose(index)
    return None if found is None else f"CUDA is unusable: {_build()} found {found[1]}"


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device ``name`` (``auto | cpu | cuda | cuda:N``) means for the process of ``local_rank`` in a job of
    ``world_size`` processes (torchrun's LOCAL_RANK and WORLD_SIZE; 0 and 1 without torchrun).

    ``cpu`` → the CPU. ``cuda`` → ``cuda:local_rank``. ``cuda:N`` → GPU N (one process only). ``auto`` → as
    ``cuda`` when CUDA works; else the CPU, with one warning line on stderr when this is a GPU machine whose CUDA
    fails (see the module docstring). Any other name, a GPU that is not there or does not work, a LOCAL_RANK with
    no GPU of its own, or ``cuda:N`` under torchrun is one ValueError naming ``device``, raised before any work.
    """
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda")
                                         or name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda:") and world_size > 1:
        raise ValueError(f"device: {name!r} would put all {world_size} processes of this torchrun job on one GPU; "
                         f"give cuda or auto (each process then takes the GPU of its LOCAL_RANK) and choose the GPUs "
                         f"with CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name[5:]) if name.startswith("cuda:") else local_rank
    if count and index >= count:
        if name.startswith("cuda:"):
            raise ValueError(f"device: {name!r} was asked for but this machine has {count} CUDA device(s), "
                             f"cuda:0 … cuda:{count - 1}")
        raise ValueError(f"device: the process of LOCAL_RANK {local_rank} has no GPU of its own: {count} CUDA "
                         f"device(s) are visible; start at most {count} processes per node "
                         f"(torchrun --nproc_per_node)")
    diagnosis = _diagnose(index if count else None)
    if diagnosis is None:
        return torch.device("cuda", index)
    kind, what = diagnosis
    if name != "auto":
        raise ValueError(f"device: {name!r} was asked for but CUDA is unusable: {_build()} found {what}; "
                         f"use auto or cpu")
    if kind not in _CPU_MACHINE:
        print(f"warning: device: auto chose the CPU because CUDA is unusable: {_build()} found {what}; "
              f"give --device cpu to silence this, or fix CUDA to train on the GPU", file=sys.stderr)
    return torch.device("cpu")


_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the workspace settings under which cuBLAS is deterministic


def configure_cuda(deterministic: bool = False) -> None:
    """Set torch's process-wide CUDA switches for training (they stay set for the rest of the process).

    Always: float32 means float32. TF32 is off for cuDNN convolutions and for matmuls (torch 2.14 runs float32
    convolutions in TF32 by default, a 10-bit mantissa, on Ampere and later). bfloat16 autocast is not affected:
    TF32 only ever replaced float32 arithmetic; the cost falls on ``precision="fp32"`` runs, whose convolutions are
    slower on a GPU with TF32 cores than they were.

    ``deterministic=False``: cuDNN autotunes (``cudnn.benchmark``: the fastest kernel per shape, picked by timing,
    so the choice and with it the last bits can differ between runs), and atomics in backward kernels (cuDNN's
    weight gradients, index_add) make the same seed give different bits on CUDA from run to run.

    ``deterministic=True``: ``torch.use_deterministic_algorithms(True)`` (an operation without a deterministic CUDA
    kernel raises instead of running), ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already ``:4096:8`` or
    ``:16:8``; cuBLAS reads it when its first handle is made, so this must run before the first CUDA matmul of the
    process), ``cudnn.deterministic`` on and ``cudnn.benchmark`` off. The same seed then gives the same bits on the
    same GPU model, driver and torch build, and ``--resume`` continues bit for bit. The cost: no autotuning, the
    deterministic (often not the fastest) cuDNN algorithms, and uninitialised memory filled on allocation.
    """
    torch.backends.cudnn.allow_tf32 = False  # the switches of every torch 2.x
    torch.backends.cuda.matmul.allow_tf32 = False
    conv = getattr(torch.backends.cudnn, "conv", None)  # torch >= 2.9 reads these first
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    if deterministic and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _CUBLAS_DETERMINISTIC:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = _CUBLAS_DETERMINISTIC[0]
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # fixed image sizes: autotuning pays off after one step
