"""CUDA semantics on a machine without a GPU, for the device-correctness tests.

`fake_cuda()` is a context in which tensors may *claim* the device ``cuda:0`` while their data stays on the CPU:

- ``torch.zeros(..., device="cuda")``, ``x.to("cuda")``, ``x.cuda()``, ``module.to("cuda")`` give tensors whose
  ``.device`` is ``cuda:0`` (real values, so results can be compared with a CPU run);
- an operation that mixes a claimed-CUDA tensor with a CPU tensor of one or more dimensions raises
  `DeviceMixError`, as CUDA does (a 0-dim CPU tensor is allowed, as on CUDA);
- a random operation that makes a CUDA tensor from a CPU ``torch.Generator`` raises `DeviceMixError` (CUDA raises
  "Expected a 'cuda' device type for generator"); ``torch.Generator(device="cuda")`` gives a generator that claims
  ``cuda`` (a CPU generator underneath);
- ``torch.cuda.is_available()`` is True, one device, bfloat16 supported; ``pin_memory()`` marks a CPU tensor pinned;
- every transfer is recorded in ``ctx.events``: ``("h2d", pinned, non_blocking)`` for a host-to-device copy,
  ``("d2h",)`` for a device-to-host copy and ``("sync",)`` for a scalar read-back (``.item()``, ``bool(t)``, ...).
  ``ctx.syncs`` counts the read-backs and device-to-host copies, ``ctx.pageable_h2d`` the host-to-device copies that
  would block (from unpinned memory, or without ``non_blocking``).

Autograd's engine cannot run a backward pass on a claimed-CUDA tensor without a driver (it asks CUDA for a context),
so a whole training step (forward, backward, optimiser) is checked on the ``meta`` device instead: `MetaStep` records
the same events and answers read-backs with a finite value.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator
from unittest import mock

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)


class DeviceMixError(RuntimeError):
    """A CPU tensor met a CUDA one (or a CPU generator fed a CUDA op): what a real GPU would raise."""


class ClaimedCuda(torch.Tensor):
    """A CPU tensor that reports device cuda:0 (``inner`` holds the data)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            layout=inner.layout, device=CUDA, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:
        return f"ClaimedCuda({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # torch runs a subclass's dispatch before an infrastructure mode's: hand the call to the active mode
        if _ACTIVE:
            return _ACTIVE[-1].handle(func, args, kwargs)
        raise RuntimeError(f"{func}: a claimed-CUDA tensor used outside fake_cuda()")

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return ClaimedCuda(inner_tensors["inner"])


class _FakeCudaGenerator(torch.Generator):
    """``torch.Generator(device="cuda")`` inside `fake_cuda`: a CPU generator that reports its device as cuda."""

    def __new__(cls, device: Any = "cpu"):
        return super().__new__(cls, "cpu")

    def __init__(self, device: Any = "cpu"):
        d = torch.device(device)
        self._claim = CUDA if d.type == "cuda" else torch.device("cpu")
        if d.type == "cuda":
            _CUDA_GENERATORS.add(self)

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._claim


_CUDA_GENERATORS: "weakref.WeakSet" = weakref.WeakSet()
_ACTIVE: list = []  # the FakeCuda modes entered, innermost last


def _generator_device(gen: torch.Generator) -> str:
    """The claimed device of ``gen``. torch hands the dispatcher a new Python object for the same generator, so a
    claimed-CUDA one is recognised by its state (two generators in the same state, one CPU and one CUDA, would be
    confused: the tests do not make such pairs)."""
    if isinstance(gen, _FakeCudaGenerator):
        return gen.device.type
    state = gen.get_state()
    return "cuda" if any(torch.equal(state, g.get_state()) for g in list(_CUDA_GENERATORS)) else "cpu"


def _device_of(value: Any) -> str | None:
    if isinstance(value, ClaimedCuda):
        return "cuda"
    if isinstance(value, torch.Tensor):
        return "cpu-scalar" if value.dim() == 0 else "cpu"
    return None


def _pinned(t: torch.Tensor) -> bool:
    return bool(getattr(t, "_fake_pinned", False))


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class _Events:
    """The transfer record of a mode: ``events`` and the two counts the tests assert."""

    events: list

    @property
    def syncs(self) -> int:
        """Read-backs and device-to-host copies (each one waits for the device)."""
        return sum(1 for e in self.events if e[0] in ("sync", "d2h"))

    @property
    def pageable_h2d(self) -> int:
        """Host-to-device copies that block (from unpinned memory, or without non_blocking)."""
        return sum(1 for e in self.events if e[0] == "h2d" and not (e[1] and e[2]))


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active (``ops``: name → count); each is roughly one kernel
    launch on a GPU (views included)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class FakeCuda(_Events, TorchDispatchMode):
    """The dispatch mode behind `fake_cuda` (see the module docstring)."""

    events: list = field(default_factory=list)

    def __post_init__(self):
        super().__init__()
        # an infrastructure "fake" mode: torch then skips CUDA's initialisation when a tensor is moved to "cuda"
        self._mode_key = torch._C._TorchDispatchModeKey.FAKE

    def _unwrap(self, x):
        return x.inner if isinstance(x, ClaimedCuda) else x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.handle(func, args, kwargs)

    def handle(self, func, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        devices = {d for d in map(_device_of, flat) if d is not None}
        name = func.overloadpacket.__name__

        # transfers --------------------------------------------------------------------------------------------
        if func is aten._to_copy.default and "device" in kwargs and kwargs["device"] is not None:
            src, dst = args[0], torch.device(kwargs["device"])
            kw = {k: v for k, v in kwargs.items() if k not in ("device", "non_blocking")}
            if dst.type == "cuda":
                if not isinstance(src, ClaimedCuda):
                    self.events.append(("h2d", _pinned(src), bool(kwargs.get("non_blocking", False))))
                return ClaimedCuda(func(self._unwrap(src), **kw))
            if isinstance(src, ClaimedCuda):
                self.events.append(("d2h",))
            return func(self._unwrap(src), device=dst, **kw)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(dst, ClaimedCuda) and not isinstance(src, ClaimedCuda) and src.dim() > 0:
                self.events.append(("h2d", _pinned(src), bool(kwargs.get("non_blocking", False))))
            elif isinstance(src, ClaimedCuda) and not isinstance(dst, ClaimedCuda):
                self.events.append(("d2h",))
            func(self._unwrap(dst), self._unwrap(src), **{k: v for k, v in kwargs.items()})
            return dst
        if func is aten._local_scalar_dense.default:
            if isinstance(args[0], ClaimedCuda):
                self.events.append(("sync",))
            return func(self._unwrap(args[0]))
        if func in (aten._pin_memory.default, aten.pin_memory.default):
            out = args[0].clone()
            out._fake_pinned = True
            return out
        if func is aten.is_pinned.default:
            return _pinned(args[0])

        # device checks ----------------------------------------------------------------------------------------
        out_cuda = _is_cuda(kwargs.get("device"))
        if "cuda" in devices and "cpu" in devices:
            shapes = [(tuple(t.shape), _device_of(t)) for t in flat if isinstance(t, torch.Tensor)]
            raise DeviceMixError(f"{func}: expected all tensors to be on the same device, found cuda:0 and cpu "
                                 f"(operands {shapes})")
        if "cuda" in devices or out_cuda:
            gen = kwargs.get("generator")
            if gen is not None and _generator_device(gen) != "cuda":
                raise DeviceMixError(f"{func}: Expected a 'cuda' device type for generator but found "
                                     f"'{gen.device.type}'")
            if "device" in kwargs:
                kwargs["device"] = torch.device("cpu")
            out = func(*tree_map(self._unwrap, args), **tree_map(self._unwrap, kwargs))
            if name in ("is_same_size", "equal", "is_nonzero", "allclose"):
                if name == "equal":
                    self.events.append(("sync",))
                return out
            return tree_map(lambda t: ClaimedCuda(t) if isinstance(t, torch.Tensor) else t, out)
        gen = kwargs.get("generator")
        if gen is not None and _generator_device(gen) == "cuda":
            raise DeviceMixError(f"{func}: a cuda generator fed a CPU operation")
        return func(*args, **kwargs)


_REAL_TOLIST, _REAL_NUMPY = torch.Tensor.tolist, torch.Tensor.numpy


def _tolist(mode: "FakeCuda"):
    def tolist(self):
        if isinstance(self, ClaimedCuda):
            mode.events.append(("d2h",))
            return _REAL_TOLIST(self.inner)
        return _REAL_TOLIST(self)
    return tolist


def _numpy(self, *args, **kwargs):
    if isinstance(self, ClaimedCuda):  # CUDA's own error
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")
    return _REAL_NUMPY(self, *args, **kwargs)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """The context of the module docstring; yields the mode (its ``events``, ``syncs``, ``pageable_h2d``)."""
    mode = FakeCuda()
    prev = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    patches = [mock.patch("torch.cuda.is_available", return_value=True),
               mock.patch("torch.cuda.device_count", return_value=1),
               mock.patch("torch.cuda.is_bf16_supported", return_value=True),
               mock.patch("torch.cuda.current_device", return_value=0),
               mock.patch("torch.cuda.synchronize", return_value=None),
               mock.patch("torch.cuda.set_device", return_value=None),
               mock.patch("torch.Generator", _FakeCudaGenerator),
               mock.patch.object(torch.Tensor, "tolist", _tolist(mode)),
               mock.patch.object(torch.Tensor, "numpy", _numpy)]
    # As FakeTensorMode does without a GPU: CUDA's device guard becomes a no-op one (moving a tensor to "cuda" asks
    # it for the current device), and torch.tensor(..., device="cuda") builds on the CPU before it is moved.
    torch._C._ensureCUDADeviceGuardSet()
    prev_lift = torch._C._only_lift_cpu_tensors()
    torch._C._set_only_lift_cpu_tensors(True)
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            with mode:
                _ACTIVE.append(mode)
                try:
                    yield mode
                finally:
                    _ACTIVE.pop()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(prev)
        torch._C._set_only_lift_cpu_tensors(prev_lift)


def real(x: Any) -> Any:
    """The CPU data of a claimed-CUDA tensor (anything else as is; nested containers mapped)."""
    return tree_map(lambda t: t.inner if isinstance(t, ClaimedCuda) else t, x)


# -------------------------------------------------------------------------------------------------------------
# The whole training step on the meta device

class MetaStep(_Events, TorchDispatchMode):
    """Records, while code runs on the ``meta`` device, copies between devices (``("h2d", pinned, non_blocking)``,
    ``("d2h",)``) and read-backs of meta tensors (``("sync",)``), and answers each read-back with ``answer`` (a
    finite number: the NaN guard passes). CPU scalars read back (torch.optim's step counters) are not recorded."""

    def __init__(self, answer: float = 1.0):
        super().__init__()
        self.events: list = []
        self.answer = answer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.events.append(("sync",))
            t = args[0]
            if t.dtype == torch.bool:
                return True
            return int(self.answer) if not (t.dtype.is_floating_point or t.dtype.is_complex) else self.answer
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            src, dst = args[0].device.type, torch.device(kwargs["device"]).type
            if src == "cpu" and dst == "meta":
                self.events.append(("h2d", False, bool(kwargs.get("non_blocking", False))))
            elif src == "meta" and dst == "cpu":
                self.events.append(("d2h",))
        if func is aten.copy_.default and args[0].device.type != args[1].device.type:
            if args[1].device.type == "cpu" and args[1].dim() > 0:
                self.events.append(("h2d", False, bool(kwargs.get("non_blocking", False))))
            elif args[1].device.type == "meta":
                self.events.append(("d2h",))
        return func(*args, **kwargs)
