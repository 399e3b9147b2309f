"""cllora_kernels: Triton kernels for cllora (fused LoRA linear with NF4 dequant, fused linear
cross-entropy, RMSNorm, RoPE, SwiGLU), each with a pure-torch reference.

Usage::

    import cllora_kernels as ck
    y = ck.lora_linear(x, w, lora_A, lora_B, scaling)   # Triton on CUDA tensors, reference on CPU
    loss = ck.linear_cross_entropy(h, lm_head_weight, targets)
    with ck.backend("triton"): ...                      # force a path (tests, benchmarks)

See ``kernels/README.md``. This package never imports ``cllora`` (the dependency goes one way).
On CPU set ``TRITON_INTERPRET=1`` before importing this package to run the Triton kernels in the
interpreter (tests do); without triton installed only the reference path exists.

The op modules share their names with the public functions (``cllora_kernels.rope`` the module vs
the function), so they are imported here first and the dispatch functions bound afterwards: the
package attributes are always the functions; reach a module with
``importlib.import_module("cllora_kernels.rope")`` (or ``from cllora_kernels.rope import rope``).
"""

import importlib as _importlib

try:  # import the Triton op modules before binding the dispatch functions of the same names
    for _name in ("lora_linear", "linear_cross_entropy", "rmsnorm", "rope", "swiglu"):
        _importlib.import_module(f"{__name__}.{_name}")
    HAS_TRITON = True
except ImportError:  # no triton: reference path only
    HAS_TRITON = False

from .dispatch import (
    backend,
    get_backend,
    linear_cross_entropy,
    lora_linear,
    rms_norm,
    rope,
    set_backend,
    swiglu,
    use_triton,
)
from .nf4 import NF4Weight, dequantize_bnb_4bit, dequantize_nf4

__all__ = [
    "HAS_TRITON",
    "NF4Weight",
    "backend",
    "dequantize_bnb_4bit",
    "dequantize_nf4",
    "get_backend",
    "linear_cross_entropy",
    "lora_linear",
    "rms_norm",
    "rope",
    "set_backend",
    "swiglu",
    "use_triton",
]
