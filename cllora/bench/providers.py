"""The providers a benchmark or a plan compares: one frozen :class:`Provider` per name.

Usage::

    from cllora.bench.providers import parse_provider

    p = parse_provider("cllora-4bit-keepattn")
    p.library, p.quant, p.checkpointing, p.keep_attention   # "cllora", "nf4", True, True
    p.baseline                                              # "hf-peft-4bit"
    parse_provider("nope")   # UnknownProvider: unknown provider 'nope'; use one of cllora, ...

A provider is what builds the model and runs its training step: ``library`` is ``cllora`` (the
model ``cllora run`` builds), ``peft`` (transformers + PEFT LoRA, ``hf-peft*``) or ``liger``
(the same with Liger-Kernel's kernels applied to the model instance first). The other fields
are the options that set the variants apart (4-bit base weights, no gradient checkpointing,
the keep-attention checkpoint policy, offloading checkpoints to host memory, releasing freed
memory to the OS); each name is spelled from its fields (:attr:`Provider.name`), so a name and
what it means cannot drift apart. :data:`PROVIDERS` is every provider ``cllora bench`` knows,
in the order its help lists them; :func:`parse_provider` is the one place a name is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_PREFIX = {"cllora": "cllora", "peft": "hf-peft", "liger": "liger"}


class UnknownProvider(ValueError):
    """A provider name that is not one of the valid ones (the message lists them)."""


@dataclass(frozen=True)
class Provider:
    """How one provider builds its model and trains (see the module docstring)."""

    library: str = "cllora"  # cllora, peft (transformers + PEFT) or liger (PEFT + Liger-Kernel)
    quant: str = "none"  # base weights: none or nf4 (double quantization)
    checkpointing: bool = True  # gradient checkpointing per decoder layer (cllora only)
    keep_attention: bool = False  # train.checkpoint_policy=keep_attention
    offload: bool = False  # train.checkpoint_offload=true (CUDA only)
    release_memory: bool = False  # train.release_memory=true

    @property
    def name(self) -> str:
        """The name users type: ``cllora-4bit-nockpt``, ``hf-peft-4bit``, ``liger``."""
        parts = [_PREFIX[self.library]] + (["4bit"] if self.quant != "none" else [])
        if self.library == "cllora":
            variants = (("nockpt", not self.checkpointing), ("keepattn", self.keep_attention),
                        ("lowmem", self.release_memory), ("offload", self.offload))  # fmt: skip
            parts += [v for v, on in variants if on]
        return "-".join(parts)

    @property
    def is_cllora(self) -> bool:
        """Built by cllora (``cllora.model.setup.build_model``), not by transformers + PEFT."""
        return self.library == "cllora"

    @property
    def cuda_only(self) -> str:
        """Why the provider needs ``--device cuda`` ("" when it runs anywhere)."""
        if self.library == "liger":
            return "runs Liger-Kernel's Triton kernels"
        return "offloads to host memory" if self.offload else ""

    @property
    def baseline(self) -> str:
        """The transformers + PEFT provider its ratios are taken against."""
        return "hf-peft-4bit" if self.quant != "none" else "hf-peft"

    def engine_options(self, cfg: Any) -> Any:
        """``cfg`` (a :class:`cllora.config.Config`) with this ``cllora*`` provider's engine
        options set: varlen attention over packed rows, its quantization, checkpointing, policy,
        offloading and memory release. Model, LoRA and data settings are the caller's."""
        cfg.model.attn = "varlen"
        cfg.model.quant = self.quant
        cfg.train.packing = True
        cfg.train.checkpointing = self.checkpointing
        cfg.train.checkpoint_policy = "keep_attention" if self.keep_attention else "full"
        cfg.train.checkpoint_offload = self.offload
        cfg.train.release_memory = self.release_memory
        return cfg


def _cllora(quant: str) -> tuple[Provider, ...]:
    lib = {"library": "cllora", "quant": quant}
    lowmem = () if quant != "none" else (Provider(**lib, release_memory=True),)
    return (
        Provider(**lib),
        Provider(**lib, checkpointing=False),
        Provider(**lib, keep_attention=True),
        *lowmem,
        Provider(**lib, offload=True),
    )


PROVIDERS: tuple[Provider, ...] = (
    *_cllora("none"),
    *_cllora("nf4"),
    *(Provider(lib, quant, checkpointing=False) for lib in ("peft", "liger")
      for quant in ("none", "nf4")),
)  # fmt: skip
NAMES: tuple[str, ...] = tuple(p.name for p in PROVIDERS)
_BY_NAME = dict(zip(NAMES, PROVIDERS, strict=True))


def parse_provider(name: str, among: tuple[str, ...] = NAMES) -> Provider:
    """The provider called ``name``; :class:`UnknownProvider`, listing the valid names, when
    ``name`` is not one of ``among`` (every provider, or the subset a caller supports)."""
    if name not in among or name not in _BY_NAME:
        raise UnknownProvider(f"unknown provider {name!r}; use one of {', '.join(among)}")
    return _BY_NAME[name]
