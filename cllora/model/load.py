"""Load a base model and its tokenizer: embedded default, local or cached HF model, or tiny one.

Usage::

    from cllora.config import ModelConfig
    from cllora.model.load import load_model

    model, tokenizer = load_model(ModelConfig(name="smollm2-135m", dtype="bf16"))
    model, tokenizer = load_model(ModelConfig(name="tiny-qwen2", dtype="fp32"), seed=0)

Names, in the order they are tried:

- ``smollm2-135m``: the embedded SmolLM2-135M-Instruct (see :mod:`cllora.model.embedded`).
- ``tiny-llama`` / ``tiny-qwen2`` / ``tiny-mistral``: randomly initialised models built from the
  real transformers config classes with small dimensions (2 layers, hidden 64), seeded, with the
  embedded tokenizer (vocab 49152). For tests; they never leave the machine.
- a preset of :mod:`cllora.model.presets` (``llama-3.1-8b``, ``qwen2.5-7b``, ...): a real
  architecture with random weights, built directly on the target device, with the embedded
  tokenizer (vocab 49152). For benchmarks at scale without downloads; the losses mean nothing.
  ``mistral-7b-v0.3`` has a smaller vocabulary (32768) than that tokenizer: use it with random
  token ids only (``cllora bench --workloads fixed``); loading it warns.
- a local directory holding a Hugging Face model (``config.json`` + weights).
- a hub id (``org/name``) that is already in the local Hugging Face cache. cllora never downloads
  at run time: anything else raises :class:`ModelNotFoundError` saying how to get the model.

The base model comes back in eval mode with every parameter frozen (``requires_grad=False``);
inject LoRA with :func:`cllora.model.lora.inject_lora`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from cllora.config import ModelConfig
from cllora.model.embedded import EMBEDDED_NAME, embedded_model_dir, embedded_tokenizer_dir
from cllora.model.presets import PRESETS, build_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """torch device for ``model.device``: ``auto`` is the first CUDA device if any, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device=cuda but torch sees no CUDA device (use auto or cpu)")
    return torch.device(name)


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """torch dtype for ``model.dtype``; ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


class ModelNotFoundError(FileNotFoundError):
    """The model is neither embedded, tiny, a local directory nor in the local HF cache."""


def _tiny_config(family: str, vocab_size: int) -> Any:
    """A small real transformers config of the given family (shapes keep GQA and odd sizes)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ModelNotFoundError(f"unknown tiny model family {family!r}; use one of {TINY_FAMILIES}")


TINY_FAMILIES = ("llama", "qwen2", "mistral")


def load_tokenizer(name: str) -> Any:
    """Tokenizer for a model name (tiny models use the embedded SmolLM2 tokenizer)."""
    path = _resolve_path(name)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if len(tok) < 100:  # transformers builds an empty tokenizer for some families without files
        raise ValueError(f"the tokenizer found there has only {len(tok)} tokens")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _resolve_path(name: str) -> Path | str:
    if name == EMBEDDED_NAME:
        return embedded_model_dir()
    if name.startswith("tiny-") or name in PRESETS:
        return embedded_tokenizer_dir()
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json")
        return path
    return name  # a hub id: resolved from the local cache only


def load_model(
    cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, Any]:
    """Load the base model (frozen, eval mode) and its tokenizer as ``cfg`` says."""
    dtype = resolve_dtype(cfg.dtype, device)
    name = cfg.name
    attn = "sdpa" if cfg.attn == "varlen" else cfg.attn  # varlen is switched on once loaded
    tokenizer = _load_tokenizer_checked(name)
    if name.startswith("tiny-"):
        family = name.removeprefix("tiny-")
        config = _tiny_config(family, vocab_size=len(tokenizer))
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = model.to(dtype)
    elif name in PRESETS:
        model = build_preset(name, dtype=dtype, device=device, seed=seed, attn=attn)
        if len(tokenizer) > model.config.vocab_size:
            logging.getLogger("cllora").warning(
                "preset %s has %d token ids but the tokenizer %d: text would index past the "
                "embedding; use it with random token ids (cllora bench --workloads fixed)",
                name, model.config.vocab_size, len(tokenizer),
            )  # fmt: skip
    else:
        path = _resolve_path(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation=attn, local_files_only=True
            )
        except OSError as err:
            raise _not_found(name) from err
    model.to(device)
    if cfg.attn == "varlen":
        from cllora.model.attention import enable_packed_attention

        enable_packed_attention(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _load_tokenizer_checked(name: str) -> Any:
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as err:
        if Path(name).expanduser().is_dir():
            raise ModelNotFoundError(
                f"{name} holds a model but no usable tokenizer (tokenizer.json or "
                f"tokenizer_config.json): {err}"
            ) from err
        raise _not_found(name) from err


def _not_found(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r} is not the embedded '{EMBEDDED_NAME}', not a tiny-* test model "
        f"({', '.join('tiny-' + f for f in TINY_FAMILIES)}), not a local directory and not in the "
        "local Hugging Face cache. cllora never downloads at run time: fetch it first "
        f"(e.g. `hf download {name}`) or pass the path of a model directory."
    )
