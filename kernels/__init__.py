"""cllora_kernels: Triton kernels for cllora (fused LoRA linear, fused linear cross-entropy, ...).

Usage: ``import cllora_kernels``. The kernels themselves land with the kernels issue; this package
never imports ``cllora`` (the dependency goes one way only).
"""
