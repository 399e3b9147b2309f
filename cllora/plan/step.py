"""The real training step of a benchmark provider, run on fake tensors: what a GPU step costs.

Usage::

    from cllora.plan.step import PlanSpec, plan_step

    point = plan_step(PlanSpec(model="llama-3.1-8b", provider="cllora-4bit", context=4096))
    point.peak_gib, point.memory_gib["activations"], point.flops, point.launches

:func:`plan_step` builds the provider's model the way ``cllora bench`` does
(:mod:`cllora.bench.cells`; the provider parsed by :func:`cllora.bench.providers.parse_provider`;
``cllora*``: :func:`cllora.model.setup.build_model` on the provider's engine config;
``hf-peft*``: transformers + PEFT, ``-4bit`` on bitsandbytes ``Linear4bit`` layers) inside
``FakeTensorMode``, so an 8B model costs no memory, warms AdamW up (one step on zero gradients,
so its state exists as in every benchmark step after the first), then traces one training step
(forward, loss, backward: the benchmark's own :func:`cllora.bench.step.training_step`; AdamW
step, ``zero_grad``) under
:class:`cllora.plan.tracker.StepTracker` on a ``fixed`` batch (``batch`` sequences of
``context`` random tokens). The peak counts everything alive on the device from the step's
start, as the benchmark's ``torch.cuda.max_memory_allocated`` after its reset does. A deep model
is traced at 2 and 3 decoder layers and extrapolated (see :func:`plan_step`): seconds per point.
``lora_path="legacy"`` plans ``LoRALinear.forward`` as of commit 44d1b83, the code the H200
measurements ran (the fp32 LoRA input), to check the planner against them.

What runs is the real code; the fake tensors live on a fake **CPU** device (a CPU-only torch
cannot fake CUDA tensors under autograd: it has no CUDA device guard). Where cllora or
transformers pick a path by device, the planner picks the CUDA one explicitly
(``target="cuda"``, the default):

- ``cllora_kernels`` is forced to its Triton path; each Triton launch is replaced by a stand-in
  that records the launch and the bytes of its tensor arguments and computes nothing (the
  outputs are allocated by the real Python wrappers, so memory is exact). The numerical
  behaviour of ``kernels/`` is untouched: nothing there is edited or registered.
- varlen attention is forced to the ``torch_varlen`` backend (``torch_attn::_varlen_attn``, a
  custom op with torch's own fake kernel); ``gqa="repeat"`` models torch 2.9-2.11, whose
  ``varlen_attn`` has no GQA (cllora repeats the K/V heads), ``gqa="native"`` torch >= 2.12.
- the LM-head loss of ``train.loss=auto`` is ``fused`` with the chunk the Triton driver picks
  on CUDA (:func:`cllora_kernels.reference.default_chunk_size`).
- bitsandbytes' ``gemm_4bit`` and ``dequantize_4bit`` are torch custom ops with fake kernels
  of their own; the CUDA kernel's hidden dequantised-weight buffer is a tracker workspace.
- SDPA (the baselines) runs torch's CPU flash kernel on fake tensors: the same saved tensors as
  CUDA's FlashAttention-2 (output and fp32 log-sum-exp); its CUDA backward scratch is a tracker
  workspace.
- AdamW runs its ``foreach`` implementation, torch's default for CUDA parameters.

``target="cpu"`` runs the CPU paths instead (lean autograd Functions, ``sdpa_segments``), exact
allocation sizes and no workspaces: what :mod:`tests.plan` compares against a real CPU step.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes as _disable_modes

from cllora.bench.providers import Provider, UnknownProvider, parse_provider
from cllora.bench.step import collate_step, training_step
from cllora.plan.tracker import OpRecord, StepTracker

# the providers of cllora.bench.providers that the planner models
PROVIDERS = ("cllora", "cllora-nockpt", "cllora-keepattn", "cllora-4bit", "cllora-4bit-nockpt",
             "cllora-4bit-keepattn", "hf-peft", "hf-peft-4bit")  # fmt: skip
GQA_MODES = ("repeat", "native")
LORA_PATHS = ("current", "legacy")
CATEGORIES = ("base_weights", "lora", "optimizer", "grads", "activations", "transients")
OTHER_KINDS = ("cast", "copy", "dequant", "elementwise")  # "outside GEMMs and attention"


class PlanError(ValueError):
    """Bad planner input (unknown model, provider or GPU): a one-line message."""


def planned_provider(name: str) -> Provider:
    """The provider ``name`` where the planner models it (:data:`PROVIDERS`); a
    :class:`PlanError` listing those otherwise."""
    try:
        return parse_provider(name, among=PROVIDERS)
    except UnknownProvider as err:
        raise PlanError(str(err)) from None


@dataclass
class PlanSpec:
    model: str = "llama-3.1-8b"  # a preset, tiny-*, or a directory holding config.json
    provider: str = "cllora-4bit"
    context: int = 4096
    batch: int = 1
    extrapolate: bool = True  # trace 2 and 3 decoder layers, extrapolate to the model's depth
    lora_path: str = "current"  # current, or legacy: LoRALinear.forward of commit 44d1b83
    dtype: str = "bf16"
    target: str = "cuda"  # the device whose code paths run: cuda or cpu
    gqa: str = "repeat"  # varlen K/V heads: repeat (torch <= 2.11) or native (>= 2.12)
    lora_r: int = 16
    quant: str | None = None  # None: from the provider's name; nf4, fp4 or none
    checkpointing: bool | None = None  # None: from the provider's name
    checkpoint_policy: str | None = None  # full or keep_attention
    kernels: str = "auto"  # auto or false (model.kernels)
    loss: str = "auto"  # train.loss of the cllora providers
    seed: int = 0


@dataclass
class PlanPoint:
    """What one planned training step costs (memory in bytes at the peak, per category)."""

    spec: PlanSpec
    peak_bytes: int
    start_bytes: int  # alive when the step starts: weights, LoRA, optimizer state
    peak_phase: str
    memory: dict[str, int]
    flops: float
    bytes_moved: int
    launches: int
    by_kind: dict[str, dict[str, float]]
    tokens: int
    plan_s: float
    parts: list[tuple[float, list[OpRecord]]] = field(default_factory=list, repr=False)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    @property
    def memory_gib(self) -> dict[str, float]:
        return {k: v / 2**30 for k, v in self.memory.items()}

    def other_bytes(self) -> int:
        """Bytes moved outside GEMMs and attention: casts, copies, dequantisation, elementwise."""
        return int(sum(self.by_kind.get(k, {}).get("bytes", 0) for k in OTHER_KINDS))

    def other_launches(self) -> int:
        return int(sum(self.by_kind.get(k, {}).get("launches", 0) for k in OTHER_KINDS))


# ------------------------------------------------------------------ models


def hf_config(model: str) -> Any:
    """The transformers config of a preset, a tiny-* model or a model directory (config.json
    only: no weights are read)."""
    from cllora.model.presets import PRESETS, preset_config

    if model in PRESETS:
        return preset_config(model)
    if model.startswith("tiny-"):
        from cllora.model.load import TINY_FAMILIES, tiny_config

        family = model.removeprefix("tiny-")
        if family not in TINY_FAMILIES:
            raise PlanError(f"unknown tiny model {model!r}; use tiny-{{{','.join(TINY_FAMILIES)}}}")
        return tiny_config(family, vocab_size=49152)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"{path} is a directory but holds no config.json")
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, json.JSONDecodeError) as err:
            raise PlanError(f"{path}/config.json is not a usable model config: {err}") from err
    raise PlanError(
        f"unknown model {model!r}: use a preset ({', '.join(sorted(PRESETS))}), tiny-llama, "
        "or a directory holding a config.json"
    )


def _bare_model(config: Any, dtype: torch.dtype, attn: str = "sdpa") -> Any:
    """A frozen eval-mode model from ``config`` (fake parameters under FakeTensorMode)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if attn == "varlen":
        from cllora.model.attention import enable_packed_attention

        enable_packed_attention(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def engine_config(spec: PlanSpec) -> Any:
    """The cllora Config of a ``cllora*`` provider, as ``cllora bench`` builds it
    (:meth:`cllora.bench.providers.Provider.engine_options`), with the spec's explicit engine
    options applied over the provider's."""
    from cllora.config import Config

    cfg = Config()
    cfg.seed = spec.seed
    cfg.model.name, cfg.model.dtype, cfg.model.device = spec.model, spec.dtype, "cpu"
    planned_provider(spec.provider).engine_options(cfg)
    cfg.model.quant = spec.quant or cfg.model.quant
    cfg.model.kernels = {"auto": "auto", "false": False}[spec.kernels]
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = spec.lora_r, 2.0 * spec.lora_r, 0.0
    if spec.checkpointing is not None:
        cfg.train.checkpointing = spec.checkpointing
    cfg.train.checkpoint_policy = spec.checkpoint_policy or cfg.train.checkpoint_policy
    cfg.train.loss = spec.loss
    return cfg


def _plan_to_4bit(
    linear: Any, quant_type: str, double_quant: bool, compute_dtype: torch.dtype | None
) -> Any:
    """:func:`cllora.model.quant._to_4bit` on fake tensors: the same ``FrozenLinear4bit``
    (forward, ``quant_state``, storage) with the packed weight a plain uint8 parameter, since
    bitsandbytes' ``Params4bit`` subclass cannot wrap a fake tensor. bitsandbytes' own
    ``quantize_4bit`` (a custom op with a fake kernel) makes the data and the state from a copy
    of the dense weight, as ``Params4bit`` quantizes the host copy it moves to the device (the
    allocator replay sees the same device allocations as the real build)."""
    from torch import nn

    from cllora.model.bnb import bnb
    from cllora.model.quant import FrozenLinear4bit

    bf = bnb.functional

    q = FrozenLinear4bit.__new__(FrozenLinear4bit)
    nn.Module.__init__(q)
    q.in_features, q.out_features = linear.in_features, linear.out_features
    dense = linear.weight.detach().clone()  # Params4bit's copy back onto the device
    data, state = bf.quantize_4bit(
        dense, blocksize=64, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=torch.uint8,
    )  # fmt: skip
    del dense
    q.weight = nn.Parameter(data, requires_grad=False)
    q.weight.quant_state = state
    q.bias = None
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    q.compute_dtype, q.compute_type_is_set = compute_dtype, compute_dtype is not None
    q.quant_type, q.compress_statistics, q.quant_storage = quant_type, double_quant, torch.uint8
    return q


@contextlib.contextmanager
def fake_building(fake: FakeTensorMode) -> Iterator[None]:
    """Inside: model building works on fake tensors (4-bit layers via :func:`_plan_to_4bit`;
    bitsandbytes' blockwise code table made for real first, as its first real use would;
    ``Module.to`` swaps fake parameters, which the fake converter's weak memo of
    ``nn.Parameter(fake)`` would block: the memo is emptied first, it only matters for
    converting the same real tensor twice, which the planner never does)."""
    from cllora.model import quant
    from cllora.model.bnb import bnb

    bf = bnb.functional
    with _disable_modes():
        bf.name2qmap.setdefault("dynamic", bf.create_dynamic_map())
    swap = torch.utils.swap_tensors

    def swap_fake(t1: torch.Tensor, t2: torch.Tensor) -> None:
        fake.fake_tensor_converter.meta_converter.tensor_memo.clear()
        swap(t1, t2)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(quant, "_to_4bit", _plan_to_4bit))
        stack.enter_context(_patched(torch.utils, "swap_tensors", swap_fake))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        yield


def _build_cllora(spec: PlanSpec, config: Any) -> tuple[Any, list]:
    from cllora.model import setup
    from cllora.model.load import resolve_dtype
    from cllora.model.lora import lora_parameters

    cfg = engine_config(spec)
    dtype = resolve_dtype(spec.dtype, spec.target)

    def load(model_cfg: Any, seed: int = 0, device: Any = "cpu") -> tuple[Any, None]:
        return _bare_model(config, dtype, model_cfg.attn), None

    with _patched(setup, "load_model", load):
        model, _, _ = setup.build_model(cfg)
    return model, lora_parameters(model)


def _build_peft(spec: PlanSpec, config: Any) -> tuple[Any, list]:
    from peft import LoraConfig, get_peft_model

    from cllora.model.load import resolve_dtype

    dtype = resolve_dtype(spec.dtype, spec.target)
    model = _bare_model(config, dtype)
    quant = spec.quant or planned_provider(spec.provider).quant
    if quant != "none":
        from cllora.model.quant import quantize_base

        quantize_base(model, quant, double_quant=True, compute_dtype=dtype)
    lcfg = LoraConfig(
        r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=0.0, target_modules="all-linear"
    )
    model = get_peft_model(model, lcfg)
    return model, [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------ CUDA code paths on CPU


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _TritonStandIn:
    """``kernel[grid](*args)`` that records one launch (and the bytes of its tensor arguments,
    ``reads`` times) instead of running."""

    def __init__(self, tracker: StepTracker, name: str, kind: str, reads: int = 1) -> None:
        self.tracker, self.name, self.kind, self.reads = tracker, name, kind, reads

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.tracker.record_kernel(self.name, tensors * self.reads, self.kind)

        return launch


_TRITON_KERNELS = (
    ("rmsnorm", "_rmsnorm_fwd", "norm_act", 1), ("rmsnorm", "_rmsnorm_bwd", "norm_act", 1),
    ("swiglu", "_swiglu_fwd", "norm_act", 1), ("swiglu", "_swiglu_bwd", "norm_act", 1),
    ("linear_cross_entropy", "_ce_rows_kernel", "loss", 2), ("rope", "_rope_kernel", "norm_act", 1),
)  # fmt: skip


@contextlib.contextmanager
def cuda_paths(tracker: StepTracker, gqa: str) -> Iterator[None]:
    """Inside: the code paths a CUDA run takes (see the module docstring)."""
    import cllora_kernels as ck

    from cllora.model import attention

    if not ck.HAS_TRITON:
        raise PlanError("planning the CUDA path needs triton importable (pip install triton)")
    with contextlib.ExitStack() as stack:
        for module, kernel, kind, reads in _TRITON_KERNELS:
            mod = importlib.import_module(f"cllora_kernels.{module}")
            stand_in = _TritonStandIn(tracker, f"triton.{kernel}", kind, reads)
            stack.enter_context(_patched(mod, kernel, stand_in))
        stack.enter_context(ck.backend("triton"))
        stack.enter_context(attention.use_backend("torch_varlen"))
        # this torch's varlen_attn takes window_size; without enable_gqa cllora repeats K/V
        params = frozenset(
            {"window_size", "scale"} | ({"enable_gqa"} if gqa == "native" else set())
        )
        stack.enter_context(_patched(attention, "_varlen_params", lambda: params))
        yield


# ------------------------------------------------------------------ the step


def _samples(spec: PlanSpec, vocab: int) -> list:
    from cllora.data.formatting import Sample

    g = torch.Generator().manual_seed(spec.seed)
    rows = torch.randint(3, min(vocab, 49000), (spec.batch, spec.context), generator=g).tolist()
    return [Sample(r, list(r)) for r in rows]


def raw_batch(spec: PlanSpec, vocab: int) -> dict:
    """The real (CPU) batch of one step, as the benchmark collates it for the provider."""
    return collate_step(planned_provider(spec.provider), _samples(spec, vocab))


def step_fn(spec: PlanSpec, model: Any, tracker: StepTracker, raw: dict) -> Any:
    """forward + loss + backward of one batch on fake tensors: the benchmark's step closure
    (:func:`cllora.bench.step.training_step`) with ``train.loss`` as the target resolves it."""
    batch = {k: tracker.real_to_fake(v) if torch.is_tensor(v) else v for k, v in raw.items()}
    provider = planned_provider(spec.provider)
    loss, chunk = _loss_mode(spec, model) if provider.is_cllora else (spec.loss, 0)
    return training_step(provider, model, batch, loss, chunk)


def _loss_mode(spec: PlanSpec, model: Any) -> tuple[str, int]:
    """``train.loss`` as the CUDA run resolves it: auto = fused, with the Triton driver's chunk."""
    if spec.target != "cuda" or spec.loss not in ("auto", "fused"):
        return spec.loss, 0
    from cllora_kernels.reference import default_chunk_size

    rows = spec.batch * (spec.context - 1)
    vocab, hidden = model.get_output_embeddings().weight.shape
    return "fused", default_chunk_size(rows, hidden, vocab)


def _categories(tracker: StepTracker, params: list, opt: Any) -> dict:
    """The peak's bytes per category (see :data:`CATEGORIES`): ``activations`` are the storages
    the forward pass created and left alive (what it keeps for the backward, checkpointed layer
    inputs included), ``transients`` everything else the step created (gradients of
    activations, recomputed layers, kernel workspaces)."""
    lora = {tracker.serial_of(p) for p in params}
    grads = {tracker.serial_of(p.grad) for p in params if p.grad is not None}
    grads |= tracker.grad_serials
    state = {tracker.serial_of(t) for s in opt.state.values() for t in s.values()
             if torch.is_tensor(t)}  # fmt: skip
    out = dict.fromkeys(CATEGORIES, 0)
    for serial, nbytes in tracker.peak_snapshot.items():
        if serial in lora:
            key = "lora"
        elif serial in grads:
            key = "grads"
        elif serial in state:
            key = "optimizer"
        elif serial in tracker.base_serials:
            key = "base_weights"
        elif tracker.created.get(serial) == "forward":
            key = "activations"
        else:
            key = "transients"
        out[key] += nbytes
    return out


def _summarise(parts: list[tuple[float, list[OpRecord]]]) -> dict[str, dict[str, float]]:
    kinds: dict[str, dict[str, float]] = {}
    for w, ops in parts:
        for op in ops:
            k = kinds.setdefault(op.kind, {"flops": 0.0, "bytes": 0.0, "launches": 0.0})
            k["flops"] += w * op.flops
            k["bytes"] += w * op.bytes
            k["launches"] += w * op.launches
    return kinds


def _legacy_lora_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``LoRALinear.forward`` as of commit 44d1b83 (the H200 measurements): the LoRA branch's
    input cast to the fp32 adapter dtype, kept for backward, the update added out of place."""
    import torch.nn.functional as F

    y = self.base(x)  # (..., out)
    h = self.dropout(x).to(self.lora_A.dtype)
    update = F.linear(F.linear(h, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
    return y + (update * self.scaling).to(y.dtype)


@dataclass
class _Trace:
    peak_bytes: int
    start_bytes: int
    peak_phase: str
    memory: dict[str, int]
    ops: list[OpRecord]
    events: list[tuple[int, int]] = field(default_factory=list, repr=False)
    step_start: int = 0  # index in events where the traced step starts


def _with_layers(config: Any, layers: int) -> Any:
    """``config`` with ``layers`` decoder layers (per-layer lists cut to match)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    return config


@contextlib.contextmanager
def known_values_are_data() -> Iterator[None]:
    """Inside: transformers' mask code treats a fake tensor that carries its real values (the
    attention mask) as data, not as a tracing placeholder. transformers' ``is_tracing`` counts
    every FakeTensor as tracing and then never skips the causal mask, so SDPA would get an
    explicit (T x T) mask and repeated K/V heads; a real run (CUDA or CPU) with an all-ones mask
    skips it and calls SDPA with ``is_causal=True`` and ``enable_gqa``."""
    from transformers import masking_utils

    tracing = masking_utils.is_tracing

    def is_tracing(tensor: Any = None) -> bool:
        if tensor is not None and getattr(tensor, "_plan_value", None) is not None:
            return tracing()
        return tracing(tensor)

    with _patched(masking_utils, "is_tracing", is_tracing):
        yield


def _warm_optimizer(opt: Any, params: list) -> None:
    """One AdamW step on zero gradients: the state exists from then on, as in every benchmark
    step after the first (whose peak the timed steps' peak includes)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def fake_session(spec: PlanSpec) -> Iterator[StepTracker]:
    """Inside: fake tensors under a :class:`StepTracker` (yielded), the code paths of
    ``spec.target`` and ``spec.lora_path``, transformers' masks as in a real run."""
    from cllora.model.lora import LoRALinear

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    cuda = spec.target == "cuda"
    tracker = StepTracker(fake, granule=512 if cuda else 1, workspaces=cuda)
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake)
        stack.enter_context(tracker)
        if cuda:
            stack.enter_context(cuda_paths(tracker, spec.gqa))
        if spec.lora_path == "legacy":
            stack.enter_context(_patched(LoRALinear, "forward", _legacy_lora_forward))
        stack.enter_context(known_values_are_data())
        yield tracker


def build_traced(spec: PlanSpec, config: Any, tracker: StepTracker) -> tuple[Any, list, Any]:
    """Inside :func:`fake_session`: the provider's model in training mode, its trainable
    parameters and their AdamW (``foreach`` on CUDA, as torch picks for CUDA parameters; no
    state yet), as ``cllora bench`` makes them."""
    build = _build_cllora if planned_provider(spec.provider).is_cllora else _build_peft
    with fake_building(tracker.fake_mode):
        try:
            model, params = build(spec, config)
        except (ValueError, NotImplementedError) as err:  # e.g. no linear layer for LoRA
            raise PlanError(f"cannot build {spec.provider} on {spec.model}: {err}") from err
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=spec.target == "cuda")
    return model, params, opt


def _trace(spec: PlanSpec, config: Any, raw: dict) -> _Trace:
    """Build on fake tensors, warm the optimizer, trace one training step."""
    with fake_session(spec) as tracker:
        model, params, opt = build_traced(spec, config, tracker)
        tracker.base_serials = set(tracker.live_serials())
        _warm_optimizer(opt, params)
        tracker.grad_serials = set()
        for p in params:
            p.register_post_accumulate_grad_hook(
                lambda p: tracker.grad_serials.add(tracker.serial_of(p.grad))
            )
        run = step_fn(spec, model, tracker, raw)
        tracker.reset_peak()
        start_bytes, step_start = tracker.current, len(tracker.events)
        tracker.ops.clear()
        tracker.phase = "forward"
        run()
        tracker.phase = "optimizer"
        opt.step()
        memory = _categories(tracker, params, opt)
        opt.zero_grad(set_to_none=True)
    return _Trace(
        tracker.peak_bytes, start_bytes, tracker.peak_phase, memory, list(tracker.ops),
        tracker.events, step_start,
    )  # fmt: skip


def plan_step(spec: PlanSpec) -> PlanPoint:
    """The cost of one training step of ``spec`` (see the module docstring).

    A model of more than 3 decoder layers is traced at 2 and at 3 layers and every quantity
    (peak and its categories, FLOPs, bytes, launches, roofline time) extrapolated linearly to
    the real depth: decoder layers are identical, so each quantity is affine in their number
    (``spec.extrapolate=False`` traces the full depth; tests compare the two).
    """
    planned_provider(spec.provider)
    if spec.gqa not in GQA_MODES:
        raise PlanError(f"unknown gqa mode {spec.gqa!r}; use one of {', '.join(GQA_MODES)}")
    if spec.lora_path not in LORA_PATHS:
        raise PlanError(f"unknown lora path {spec.lora_path!r}; use one of {LORA_PATHS}")
    config = hf_config(spec.model)
    start = time.perf_counter()
    raw = raw_batch(spec, config.vocab_size)
    layers = config.num_hidden_layers
    if spec.extrapolate and layers > 3:
        lo, hi = (_trace(spec, _with_layers(config, n), raw) for n in (2, 3))
        k = layers - 2
        parts = [(1.0 - k, lo.ops), (float(k), hi.ops)]
        peak = round(lo.peak_bytes + k * (hi.peak_bytes - lo.peak_bytes))
        start_bytes = round(lo.start_bytes + k * (hi.start_bytes - lo.start_bytes))
        memory = {c: round(lo.memory[c] + k * (hi.memory[c] - lo.memory[c])) for c in CATEGORIES}
        phase = hi.peak_phase
    else:
        full = _trace(spec, config, raw)
        parts, peak, memory, phase = (
            [(1.0, full.ops)],
            full.peak_bytes,
            full.memory,
            full.peak_phase,
        )
        start_bytes = full.start_bytes
    kinds = _summarise(parts)
    return PlanPoint(
        spec=spec,
        peak_bytes=peak,
        start_bytes=start_bytes,
        peak_phase=phase,
        memory=memory,
        flops=sum(v["flops"] for v in kinds.values()),
        bytes_moved=round(sum(v["bytes"] for v in kinds.values())),
        launches=round(sum(v["launches"] for v in kinds.values())),
        by_kind=kinds,
        tokens=spec.batch * spec.context,
        plan_s=time.perf_counter() - start,
        parts=parts,
    )
