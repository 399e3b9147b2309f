"""A dispatch mode that follows one training step on fake tensors: live storages, FLOPs, bytes.

Usage::

    from torch._subclasses.fake_tensor import FakeTensorMode
    from cllora.plan.tracker import StepTracker

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, StepTracker(fake) as tr:
        x = tr.real_to_fake(torch.arange(8))     # a fake tensor that remembers its real values
        ...                                      # build a model, run forward/backward/step
    tr.peak_bytes, tr.ops[:3]                    # peak live bytes; one OpRecord per kernel

What it records, for every aten (or custom) operator that reaches the dispatcher:

- **Memory**: every storage an operator creates is counted from its creation until Python frees
  it (a weak reference's callback on the ``UntypedStorage``, the same technique as torch's
  ``torch.distributed._tools.mem_tracker``), rounded up to the CUDA caching allocator's 512-byte
  granule. ``peak_bytes`` is the most bytes alive at once since :meth:`StepTracker.reset_peak`,
  and ``peak_snapshot`` the storages alive at that moment, each with the operator and the phase
  (forward, backward, optimizer) that created it, for :mod:`cllora.plan.step` to classify.
  Kernels that allocate scratch memory the dispatcher never sees add it as a **workspace**
  around the operator (:data:`WORKSPACES`: FlashAttention-2's backward accumulators, the
  bitsandbytes dequantised weight of ``gemm_4bit`` at training batch sizes). Where autograd
  writes in place on real tensors but not on tensor subclasses (fake ones included: summing two
  gradients of one input, ``index``'s backward), the tracker runs the in-place operator, so the
  allocations and frees follow a real step's in order (:func:`_in_place_on_real`).
- **FLOPs**: torch's own formulas (``torch.utils.flop_counter.flop_registry``: mm, addmm, bmm,
  SDPA/flash kernels) plus formulas here for the custom ops (bitsandbytes ``gemm_4bit``, torch's
  ``varlen_attn``; a causal attention counts half of the dense product, what causal kernels do).
- **Bytes**: the elements each operator reads (tensor inputs) and writes (tensor outputs); view
  and metadata operators move nothing and launch nothing.
- **Launches**: one per operator that runs a kernel (views, ``empty``, ``detach`` excluded);
  kernels replaced by :meth:`StepTracker.record_kernel` (Triton stand-ins) count one each.

Data-dependent operators (``.item()``, ``.tolist()``, boolean-mask indexing, ``nonzero``) cannot
run on fake tensors alone, so integer/bool tensors made with :meth:`StepTracker.real_to_fake`
carry their real values along: any operator whose tensor inputs all carry values is also run on
the real values (small integer tensors only: token ids, labels, masks, ``cu_seqlens``), which is
what lets the real cllora and transformers code paths select targets and build masks.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
GRANULE = 512  # bytes: the CUDA caching allocator rounds every block up to this
_VALUE_LIMIT = 1 << 22  # elements: larger tensors never carry real values

_NO_KERNEL = {
    aten.detach.default, aten.alias.default, aten._unsafe_view.default, aten.empty.memory_format,
    aten.empty_strided.default, aten.new_empty.default, aten.new_empty_strided.default,
    aten.empty_like.default, aten.lift_fresh.default, aten._local_scalar_dense.default,
    aten.resize_.default, aten.set_.source_Storage_storage_offset, aten.sym_size.int,
    aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.is_same_size.default, aten._has_compatible_shallow_copy_type.default,
}  # fmt: skip
_GEMMS = (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_, aten.matmul)
_FACTORIES = {
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default,
    aten.ones.default, aten.full.default, aten.scalar_tensor.default,
}  # fmt: skip
_DATA_DEPENDENT = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
}


@dataclass
class OpRecord:
    """One kernel launch (or a no-launch operator) of the traced step."""

    name: str
    phase: str
    flops: float
    bytes: int
    launches: int
    kind: str  # gemm, attention, dequant, norm_act, loss, cast, copy, elementwise, optimizer


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------ FLOPs of the custom ops


def _gemm_4bit_flops(args: tuple, kwargs: dict, out: Any) -> float:
    a, shape_b = args[0], args[2]
    return 2.0 * (a.numel() // a.shape[-1]) * shape_b[0] * shape_b[1]


def _segments(cu: torch.Tensor) -> list[int]:
    vals = getattr(cu, "_plan_value", None)
    if vals is None:
        return []
    with _disable_current_modes():  # a real tensor: read it outside the fake mode
        v = vals.tolist()
    return [e - s for s, e in itertools.pairwise(v)]


def _varlen_flops(q: torch.Tensor, k: torch.Tensor, cu: torch.Tensor, backward: bool) -> float:
    lens = _segments(cu) or [q.shape[0]]
    h, d = q.shape[1], q.shape[2]
    total = 0.0
    for n in lens:
        shape_q, shape_k = (1, h, n, d), (1, k.shape[1] * (h // k.shape[1]), n, d)
        if backward:
            total += sdpa_backward_flop_count(shape_q, shape_q, shape_k, shape_k)
        else:
            total += sdpa_flop_count(shape_q, shape_k, shape_k)
    return total * 0.5  # causal: only the lower triangle is computed


def _varlen_fwd_flops(args: tuple, kwargs: dict, out: Any) -> float:
    return _varlen_flops(args[0], args[1], args[3], backward=False)


def _varlen_bwd_flops(args: tuple, kwargs: dict, out: Any) -> float:
    # (grad_out, q, k, v, out, lse, cu_seq_q, ...)
    return _varlen_flops(args[1], args[2], args[6], backward=True)


def _cpu_flash_flops(args: tuple, kwargs: dict, out: Any) -> float:
    q, k = args[0], args[1]
    shape_k = (*k.shape[:1], q.shape[1], *k.shape[2:])
    causal = kwargs.get("is_causal", args[4] if len(args) > 4 else False)  # q, k, v, p, causal
    flops = sdpa_flop_count(tuple(q.shape), shape_k, shape_k)
    return flops * (0.5 if causal else 1.0)


def _cpu_flash_bwd_flops(args: tuple, kwargs: dict, out: Any) -> float:
    g, q, k = args[0], args[1], args[2]
    shape_k = (*k.shape[:1], q.shape[1], *k.shape[2:])
    causal = kwargs.get("is_causal", args[7] if len(args) > 7 else False)
    flops = sdpa_backward_flop_count(tuple(g.shape), tuple(q.shape), shape_k, shape_k)
    return flops * (0.5 if causal else 1.0)


def _addmm_inplace_flops(args: tuple, kwargs: dict, out: Any) -> float:
    """``C.addmm_(A, B)`` (or ``baddbmm_``): the product's ``2 M N K`` (torch's registry has the
    out-of-place ops only)."""
    a, b = args[1], args[2]
    return 2.0 * (a.numel() // a.shape[-1]) * a.shape[-1] * b.shape[-1]


def _custom_flops() -> dict[Any, Callable[[tuple, dict, Any], float]]:
    """FLOP formulas of the custom ops (their libraries imported first: an op namespace exists
    only once its library registered it)."""
    for module in ("bitsandbytes", "torch.nn.attention.varlen"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    table: dict[Any, Callable[[tuple, dict, Any], float]] = {
        aten.addmm_: _addmm_inplace_flops,
        aten.baddbmm_: _addmm_inplace_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd_flops,
    }
    for name, fn in (("bitsandbytes", "gemm_4bit"),):
        packet = getattr(getattr(torch.ops, name, None), fn, None)
        if packet is not None:
            table[packet] = _gemm_4bit_flops
    attn = getattr(torch.ops, "torch_attn", None)
    if attn is not None and hasattr(attn, "_varlen_attn"):
        table[attn._varlen_attn] = _varlen_fwd_flops
        if hasattr(attn, "_varlen_attn_backward"):
            table[attn._varlen_attn_backward] = _varlen_bwd_flops
    return table


# ------------------------------------------------------------------ workspaces of CUDA kernels


def _fa2_backward_workspace(q: torch.Tensor, k: torch.Tensor, varlen: bool) -> list[int]:
    """FlashAttention-2's backward scratch (flash_api.cpp, ``mha_bwd`` / ``mha_varlen_bwd``),
    allocated after the ``dq``/``dk``/``dv`` outputs, in this order: ``softmax_d`` fp32 (heads x
    tokens rounded to 128 per sequence), ``dq_accum`` fp32 (the same x head_dim rounded to 32)
    and, for GQA, ``dk``/``dv`` expanded to the query heads before they are summed back."""
    if varlen:  # (T, H, D), one sequence set: 128 rows of slack per sequence (batch 1 here)
        tokens, hq, d = q.shape[0] + 128, q.shape[1], q.shape[2]
    else:  # (B, H, T, D)
        tokens, hq, d = q.shape[0] * (128 * math.ceil(q.shape[2] / 128)), q.shape[1], q.shape[3]
    d_round = 32 * math.ceil(d / 32)
    sizes = [tokens * hq * 4, tokens * hq * d_round * 4]
    if k.shape[1] != hq:
        sizes += [tokens * hq * d * q.element_size()] * 2
    return sizes


def _gemm_4bit_workspace(args: tuple, kwargs: dict) -> list[int]:
    """bitsandbytes ``gemm_4bit`` on CUDA past M=1536 rows (``_dequant_linear_fallback``),
    allocated before the output and freed on return: for a nested (double-quantised) state the
    fp32 absmax twice (dequantised, then plus its offset), then the (N, K) weight dequantised
    into the activation dtype."""
    a, shape_b, blocksize = args[0], args[2], args[4]
    rows = a.numel() // a.shape[-1]
    if rows <= 1536:
        return []
    n, k = shape_b
    nested = kwargs.get("absmax_8bit") is not None or (len(args) > 7 and args[7] is not None)
    return [-(n * k // -blocksize) * 4] * (2 * nested) + [n * k * a.element_size()]


# ------------------------------------------------------------------ autograd's accumulation

_WRAPPER_FILES = ("torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch",
                  "torch/_subclasses/", "cllora/plan/tracker.py")  # fmt: skip
_IN_PLACE_ON_REAL = {
    aten.add.Tensor: aten.add_.Tensor,
    aten.index_put.default: aten.index_put_.default,
}


def _in_place_on_real(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether autograd's engine, running this out-of-place operator itself, would write into
    its first operand on real tensors.

    Two backward steps pick their path by whether a tensor is a subclass, which every
    ``FakeTensor`` is: the engine's sum of two gradients of one input (``InputBuffer::
    accumulate``: ``old + new``, written into ``old`` when the engine holds the last reference
    to it and its storage) and ``index``'s backward (``index_put`` into fresh zeros, in place on
    plain tensors). On fake tensors each is a new buffer the real step never allocates (for the
    sums: a (tokens x hidden) or (tokens x intermediate) block per summed gradient, in every
    layer), which misplaces the caching allocator's blocks (:mod:`cllora.plan.allocator`). So
    the tracker runs the in-place operator where the engine would: the call comes straight from
    the engine (the innermost Python frame past dispatch wrappers is ``_engine_run_backward``;
    a Python ``backward`` or a checkpointed recompute has frames of its own), grad mode is off,
    the first operand is contiguous and nothing else shares its storage (its use count: the
    tensor and the Python storage object asked for here), and for a sum the operands match."""
    if torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return False
    first = args[0]
    if func is aten.add.Tensor:
        other = args[1] if len(args) == 2 and not kwargs else None
        if not isinstance(other, torch.Tensor) or other.shape != first.shape:
            return False
        if other.dtype != first.dtype:
            return False
    elif not (len(args) > 3 and args[3] is True):  # index_put(zeros, indices, grad, accumulate)
        return False
    if not first.is_contiguous():
        return False
    frame = sys._getframe(1)
    while frame is not None and any(w in frame.f_code.co_filename for w in _WRAPPER_FILES):
        frame = frame.f_back
    if frame is None or frame.f_code.co_name != "_engine_run_backward":
        return False
    return torch._C._storage_Use_Count(first.untyped_storage()._cdata) <= 2


# ------------------------------------------------------------------ the mode


@dataclass
class _Live:
    nbytes: int
    serial: int


class StepTracker(TorchDispatchMode):
    """See the module docstring. ``granule``: allocation rounding (CUDA: 512 bytes; 1 for a
    CPU comparison). ``workspaces``: add the CUDA kernels' hidden scratch buffers."""

    def __init__(self, fake_mode: Any, granule: int = GRANULE, workspaces: bool = True) -> None:
        super().__init__()
        self.fake_mode, self.granule, self.workspaces = fake_mode, granule, workspaces
        self.phase = "setup"
        self.current = self.peak_bytes = 0
        self.peak_phase = ""
        self.ops: list[OpRecord] = []
        self.peak_snapshot: dict[int, int] = {}
        self.created: dict[int, str] = {}  # serial -> phase that created the storage
        self.creator: dict[int, str] = {}  # serial -> operator that created it
        # (serial, bytes) allocations and (serial, 0) frees in order, workspaces included (with
        # negative serials): what cllora.plan.allocator replays
        self.events: list[tuple[int, int]] = []
        # told of every event as it happens (cllora.plan.allocator.LiveReplay); an allocation it
        # refuses raises from the operator that allocates and is not recorded
        self.listener: Callable[[int, int], None] | None = None
        self._op_name = "setup"
        self._live: dict[int, _Live] = {}  # id(storage) -> live entry
        self._refs: dict[int, weakref.ref] = {}
        self._next = 0
        self._custom = _custom_flops()
        self._snapshot_at = 0

    # -------------------------------------------------------------- storages

    def current_phase(self) -> str:
        """``phase``, or ``backward`` while autograd's engine runs a backward pass."""
        if self.phase == "forward" and torch._C._current_graph_task_id() != -1:
            return "backward"
        return self.phase

    def _emit(self, serial: int, nbytes: int) -> None:
        """Record an allocation (``nbytes`` > 0) or the free of ``serial``, the listener first."""
        if self.listener is not None:
            self.listener(serial, nbytes)
        self.events.append((serial, nbytes))

    def _round(self, n: int) -> int:
        return self.granule * math.ceil(n / self.granule) if n else 0

    def serial_of(self, t: torch.Tensor) -> int | None:
        """The tracker's id of ``t``'s storage (None if untracked)."""
        try:
            live = self._live.get(id(t.untyped_storage()))
        except (RuntimeError, NotImplementedError):
            return None
        return None if live is None else live.serial

    def track(self, t: torch.Tensor) -> int:
        """Count ``t``'s storage from now until it is freed; returns its serial."""
        st = t.untyped_storage()
        key = id(st)
        live = self._live.get(key)
        ref = self._refs.get(key)
        nbytes = self._round(st.nbytes())
        if live is not None and ref is not None and ref() is st:
            if nbytes != live.nbytes:  # resized in place
                self._emit(live.serial, 0)
                self._emit(live.serial, st.nbytes())
                self.current += nbytes - live.nbytes
                live.nbytes = nbytes
                self._update_peak()
            return live.serial
        self._emit(self._next + 1, st.nbytes())
        self._next += 1
        self.created[self._next] = self.current_phase()
        self.creator[self._next] = self._op_name
        self._live[key] = _Live(nbytes, self._next)
        self._refs[key] = weakref.ref(st, self._freed_callback(key, self._next))
        self.current += nbytes
        self._update_peak()
        return self._next

    def _freed_callback(self, key: int, serial: int) -> Callable[[Any], None]:
        def freed(_: Any) -> None:
            live = self._live.get(key)
            if live is not None and live.serial == serial:
                self._emit(serial, 0)
                self.current -= live.nbytes
                del self._live[key]
                self._refs.pop(key, None)

        return freed

    def _update_peak(self, extra: int = 0) -> None:
        total = self.current + extra
        if total <= self.peak_bytes:
            return
        self.peak_bytes, self.peak_phase = total, self.current_phase()
        if total > self._snapshot_at * 1.001 or not self.peak_snapshot:
            self._snapshot_at = total
            self.peak_snapshot = {v.serial: v.nbytes for v in self._live.values()}
            if extra:
                self.peak_snapshot[-1] = extra  # the workspace of the running kernel

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now."""
        self.peak_bytes, self._snapshot_at, self.peak_snapshot = 0, 0, {}
        self._update_peak()

    def live_serials(self) -> dict[int, int]:
        return {v.serial: v.nbytes for v in self._live.values()}

    # -------------------------------------------------------------- values of small int tensors

    def real_to_fake(self, t: torch.Tensor) -> torch.Tensor:
        """A fake copy of the real tensor ``t`` that carries ``t``'s values along."""
        with _disable_current_modes():
            real = t.detach().clone()
        fake = self.fake_mode.from_tensor(real)
        fake._plan_value = real
        self.track(fake)
        return fake

    @staticmethod
    def _value(x: torch.Tensor) -> torch.Tensor | None:
        """The real values ``x`` carries: its own for a real (non-fake) tensor."""
        if not isinstance(x, torch._subclasses.fake_tensor.FakeTensor):
            return x
        return getattr(x, "_plan_value", None)

    def _values(self, args: tuple, kwargs: dict) -> tuple[bool, tuple, dict]:
        tensors = _tensors((args, kwargs))
        if not tensors or any(self._value(t) is None for t in tensors):
            return False, args, kwargs

        def real(x: Any) -> Any:
            return self._value(x) if isinstance(x, torch.Tensor) else x

        return True, tree_map(real, args), tree_map(real, kwargs)

    def _drop_stale_values(self, func: Any, args: tuple, kwargs: dict) -> None:
        """An in-place operator whose inputs do not all carry values leaves the values of the
        tensors it writes stale: forget them."""
        if not func._schema.is_mutable:
            return
        for t in _tensors((args, kwargs)):
            if getattr(t, "_plan_value", None) is not None:
                del t._plan_value

    def _attach(self, out: Any, real_out: Any) -> None:
        for o, r in zip(tree_flatten(out)[0], tree_flatten(real_out)[0], strict=False):
            tensors = isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor)
            if tensors and r.numel() <= _VALUE_LIMIT:
                o._plan_value = r

    def _bool_indices_to_long(self, func: Any, args: tuple) -> tuple:
        """``x[mask]`` with a value-carrying bool mask: the same ``aten.index`` on the mask's
        (real) nonzero positions, so the output shape is known."""
        if func is not aten.index.Tensor:
            return args
        indices = []
        changed = False
        for idx in args[1]:
            real = getattr(idx, "_plan_value", None) if idx is not None else None
            if real is not None and real.dtype == torch.bool:
                with _disable_current_modes():
                    parts = real.nonzero(as_tuple=True)
                indices += [self.real_to_fake(p) for p in parts]
                changed = True
            else:
                indices.append(idx)
        return (args[0], indices, *args[2:]) if changed else args

    # -------------------------------------------------------------- dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            return func(*args, **kwargs)
        self._op_name = str(func)
        serials: list[int] = []  # the kernel's workspaces: freed on return, or on an error
        try:
            return self._dispatch(func, args, kwargs, serials)
        finally:
            for serial in serials:
                self._emit(serial, 0)

    def _dispatch(self, func: Any, args: tuple, kwargs: dict, serials: list[int]) -> Any:
        has_values, real_args, real_kwargs = self._values(args, kwargs)
        real_out, ran_real, before, after = None, False, [], []
        if func in _DATA_DEPENDENT:
            if not has_values:
                raise RuntimeError(
                    f"{func} needs real values, and its input carries none (only small integer "
                    "tensors made by StepTracker.real_to_fake do)"
                )
            with _disable_current_modes():
                real_out = func(*real_args, **real_kwargs)
            if func is aten._local_scalar_dense.default:
                return real_out
            out = self.fake_mode.from_tensor(real_out)
        else:
            args = self._bool_indices_to_long(func, args)
            if func in _IN_PLACE_ON_REAL and _in_place_on_real(func, args, kwargs):
                func = _IN_PLACE_ON_REAL[func]  # what autograd runs on real tensors (see below)
            before, after = self._workspace(func, args, kwargs)
            if before:  # scratch the kernel allocates before its output, freed on return
                self._scratch(before, serials)
            out = func(*args, **kwargs)
            # the real values follow only where the outputs are small (never a (T x T) mask)
            small = all(t.numel() <= _VALUE_LIMIT for t in _tensors(out))
            if small and (has_values or func in _FACTORIES):
                ran_real = True
                with _disable_current_modes():
                    if has_values:
                        real_out = func(*real_args, **real_kwargs)
                    else:
                        real_out = func(*args, **kwargs)
        if real_out is not None:
            self._attach(out, real_out)
        elif not ran_real:  # an in-place op the real values did not follow: they are stale
            self._drop_stale_values(func, args, kwargs)
        for t in _tensors(out):
            self.track(t)
        if after:  # scratch allocated after the outputs
            self._scratch(after, serials)
        self._record(func, args, kwargs, out)
        return out

    def _scratch(self, sizes: list[int], serials: list[int]) -> None:
        """Workspace blocks of the running kernel, appended to ``serials``: on top of the live
        bytes for the peak, and allocation events (negative serials) for the allocator."""
        for n in sizes:
            serial = -1 - len(self.events)
            self._emit(serial, n)
            serials.append(serial)
        self._update_peak(sum(self._round(n) for n in sizes))

    def _workspace(self, func: Any, args: tuple, kwargs: dict) -> tuple[list[int], list[int]]:
        """(scratch before the output, scratch after it) of a CUDA kernel, in bytes."""
        if not self.workspaces:
            return [], []
        name = str(func)
        if "gemm_4bit" in name:
            return _gemm_4bit_workspace(args, kwargs), []
        if "_varlen_attn_backward" in name:
            return [], _fa2_backward_workspace(args[1], args[2], varlen=True)
        if "flash_attention" in name and "backward" in name and "for_cpu" in name:
            return [], _fa2_backward_workspace(args[1], args[2], varlen=False)
        return [], []

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        packet = func.overloadpacket
        if func in _NO_KERNEL or func.is_view or func is aten._local_scalar_dense.default:
            self.ops.append(OpRecord(str(func), self.current_phase(), 0.0, 0, 0, "metadata"))
            return
        flops = 0.0
        if packet in self._custom:  # first: torch's registry counts causal attention in full
            flops = float(self._custom[packet](args, kwargs, out))
        elif packet in flop_registry:
            flops = float(flop_registry[packet](*args, out_val=out, **kwargs))
        moved = sum(_nbytes(t) for t in _tensors((args, kwargs)))
        moved += sum(_nbytes(t) for t in _tensors(out))
        moved += self._extra_bytes(func, args, kwargs)
        phase = self.current_phase()
        self.ops.append(OpRecord(str(func), phase, flops, moved, 1, self._kind(func, args)))

    def _extra_bytes(self, func: Any, args: tuple, kwargs: dict) -> int:
        """Traffic the operator's arguments do not show: ``gemm_4bit``'s fallback writes the
        dequantised weight and reads it back into the GEMM."""
        if "gemm_4bit" in str(func) and self.workspaces:
            return 2 * sum(_gemm_4bit_workspace(args, kwargs)[-1:])
        return 0

    def _kind(self, func: Any, args: tuple) -> str:
        name = str(func)
        if self.phase == "optimizer":
            return "optimizer"
        if "gemm_4bit" in name or func.overloadpacket in _GEMMS:
            return "gemm"
        if "attention" in name or "varlen_attn" in name:
            return "attention"
        if "dequantize" in name:
            return "dequant"
        if func.overloadpacket in (aten._to_copy,):
            return "cast"
        if func.overloadpacket in (aten.copy_, aten.clone, aten.cat, aten.index, aten.repeat,
                                   aten.repeat_interleave, aten.index_select, aten.index_put_,
                                   aten.index_put, aten.stack, aten.gather, aten.scatter,
                                   aten.slice_backward, aten.select_backward):  # fmt: skip
            return "copy"
        if func.overloadpacket in (aten._log_softmax, aten._log_softmax_backward_data,
                                   aten.nll_loss_forward, aten.nll_loss_backward,
                                   aten.logsumexp):  # fmt: skip
            return "loss"
        return "elementwise"

    def record_kernel(self, name: str, tensors: list[torch.Tensor], kind: str) -> None:
        """A kernel launched outside the dispatcher (a Triton stand-in): bytes are the sizes of
        its tensor arguments, each read or written once."""
        moved = sum(_nbytes(t) for t in tensors)
        self.ops.append(OpRecord(name, self.current_phase(), 0.0, moved, 1, kind))
