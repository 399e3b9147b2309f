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
- a local directory holding a Hugging Face model (``config.json``, weights, tokenizer).
- a hub id (``org/name``) that is already in the local Hugging Face cache. cllora never downloads
  at run time: anything else raises :class:`ModelNotFoundError` saying how to get the model.

A directory (or cached hub snapshot) is checked before transformers sees it, so each fault is one
line naming the cause and the fix: no ``config.json``, no weights, a weights file that cannot be
read (truncated, not safetensors: :func:`check_model_dir`), a shard the index lists but the
directory lacks, no tokenizer. A name that is a path (``/x``, ``./x``, ``~/x``, ``a/b/c``) and
does not exist is reported as a missing directory, never with a download command.

:func:`peft_base_path` is what an adapter's ``base_model_name_or_path`` names for each kind of
name (see :mod:`cllora.model.adapter`).

The base model comes back in eval mode with every parameter frozen (``requires_grad=False``);
inject LoRA with :func:`cllora.model.lora.inject_lora`.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from cllora.config import ModelConfig
from cllora.model.embedded import (
    EMBEDDED_NAME,
    CacheError,
    embedded_cache_dir,
    embedded_model_dir,
    embedded_tokenizer_dir,
)
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


def tiny_config(family: str, vocab_size: int) -> Any:
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
    path = resolve_path(name)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if len(tok) < 100:  # transformers builds an empty tokenizer for some families without files
        raise ValueError(f"the tokenizer found there has only {len(tok)} tokens")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_path(name: str) -> Path | str:
    """What transformers loads for ``name``: a directory, or a hub id (from the cache only)."""
    if name == EMBEDDED_NAME:
        return embedded_model_dir()
    if name.startswith("tiny-") or name in PRESETS:
        return embedded_tokenizer_dir()
    path = _local_path(name)
    if path is not None:
        check_local_model(path)
        return path
    return name  # a hub id: resolved from the local cache only


def model_kind(name: str) -> str:
    """``embedded``, ``tiny``, ``preset``, ``directory`` (a local path, existing or not) or
    ``hub`` (a hub id); ``""`` for an empty name."""
    if not name:
        return ""
    if name == EMBEDDED_NAME:
        return "embedded"
    if name.startswith("tiny-"):
        return "tiny"
    if name in PRESETS:
        return "preset"
    return "directory" if _local_path(name) is not None else "hub"


def peft_base_path(name: str) -> str:
    """The ``base_model_name_or_path`` an adapter of a run on ``name`` records.

    What ``AutoModelForCausalLM.from_pretrained`` (and so PEFT's ``AutoPeftModelForCausalLM``)
    loads offline: the absolute path of the converted embedded model's directory, the absolute
    path of a local model directory, or the hub id of a cached hub model. The tiny test models
    and the presets have random weights that no directory holds: their cllora name is kept
    (rebuild them with :func:`load_model` and the run's seed; the adapter's README says how).
    """
    kind = model_kind(name)
    if kind == "embedded":
        return str(embedded_cache_dir())
    if kind == "directory":
        return str(Path(name).expanduser().resolve())
    return name


def _local_path(name: str) -> Path | None:
    """The filesystem path ``name`` denotes: it exists, or it cannot be a hub id (``/x``,
    ``./x``, ``~/x``, ``a/b/c``). None for a hub id."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.exists():
        return path
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return path
    return None


def check_local_model(path: Path) -> None:
    """A local path names an existing model directory with readable files, or raises."""
    if not path.exists():
        raise ModelNotFoundError(
            f"model directory {path} does not exist (resolved: {path.absolute()}); pass the path "
            "of a directory holding config.json, the weights and the tokenizer"
        )
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a file, not a model directory; pass the directory holding config.json, "
            "the weights and the tokenizer"
        )
    check_model_dir(path)


def _cached_snapshot(hub_id: str) -> Path | None:
    """The local HF cache snapshot directory of ``hub_id`` (its config.json is cached), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(hub_id, "config.json")
    except ValueError:  # not a valid repo id after all
        return None
    return Path(found).parent if isinstance(found, str) else None


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")  # fmt: skip
_REDO = "re-save or re-download the model"


def check_model_dir(path: Path, redo: str = _REDO) -> None:
    """The directory holds a readable ``config.json`` and weights, or a one-line
    :class:`ModelNotFoundError` names what is wrong and ``redo`` (the fix for damaged files).

    Safetensors files are checked through their header (cheap: no tensor is read): a file too
    short for it, a header that is not JSON, or tensor data past the end of the file (truncated).
    """
    config = path / "config.json"
    if not config.is_file():
        raise ModelNotFoundError(
            f"{path} is a directory but holds no config.json: pass the directory of a Hugging "
            "Face model (config.json, weights, tokenizer), e.g. one written by save_pretrained"
        )
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelNotFoundError(
            f"config.json in {path} cannot be read: {one_line(err)}; {redo}"
        ) from err
    found = [name for name in _WEIGHTS if (path / name).is_file()]
    if not found:
        raise ModelNotFoundError(
            f"{path} holds config.json but no weights (model.safetensors, model.safetensors."
            "index.json with its shards, or pytorch_model.bin): save the model there with "
            "save_pretrained, or pass the directory that holds its weights"
        )
    for name in _weight_files(path, found[0], redo):
        if name.endswith(".safetensors"):
            problem = safetensors_problem(path / name)
            if problem:
                raise ModelNotFoundError(f"{name} in {path} cannot be read: {problem}; {redo}")


def _weight_files(path: Path, first: str, redo: str) -> list[str]:
    """The weight files of the directory: ``first`` itself or the shards its index lists."""
    if not first.endswith(".index.json"):
        return [first]
    try:
        shards = sorted(set(json.loads((path / first).read_text())["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelNotFoundError(
            f"{first} in {path} cannot be read: {one_line(err)}; {redo}"
        ) from err
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{first} in {path} lists {', '.join(missing)}, which the directory lacks; {redo}"
        )
    return shards


def safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be read (``None`` when its header and size are sound)."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"the file is {size} bytes, too short for a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"not a safetensors file (its header length says {n} bytes, the file has {size})"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                      default=0)  # fmt: skip
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            return f"its header is not a safetensors header ({one_line(err)})"
    if 8 + n + end > size:
        return f"truncated: the header describes {8 + n + end} bytes, the file has {size}"
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        return one_line(err)
    return None


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """An error's message on one line (whitespace collapsed), cut at ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_dir(name: str) -> Path | None:
    """Check ``name``'s files before transformers reads them; its directory (a local one or the
    cached hub snapshot), or None for the embedded, tiny and preset models."""
    kind = model_kind(name)
    if kind == "directory":
        path = Path(name).expanduser()
        check_local_model(path)
        return path
    if kind != "hub":
        return None
    snapshot = _cached_snapshot(name)
    if snapshot is None:
        raise _not_found(name)
    check_model_dir(snapshot, redo=f"fetch it again (`hf download {name}`)")
    return snapshot


def load_model(
    cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, Any]:
    """Load the base model (frozen, eval mode) and its tokenizer as ``cfg`` says."""
    dtype = resolve_dtype(cfg.dtype, device)
    name = cfg.name
    attn = "sdpa" if cfg.attn == "varlen" else cfg.attn  # varlen is switched on once loaded
    directory = _model_dir(name)
    tokenizer = _load_tokenizer_checked(name, directory)
    if name.startswith("tiny-"):
        family = name.removeprefix("tiny-")
        config = tiny_config(family, vocab_size=len(tokenizer))
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
        model = _from_pretrained(name, directory, dtype, attn)
    model.to(device)
    if cfg.attn == "varlen":
        from cllora.model.attention import enable_packed_attention

        enable_packed_attention(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _from_pretrained(name: str, directory: Path | None, dtype: torch.dtype, attn: str) -> Any:
    """transformers' load of a checked directory or cached hub id; its faults in one line."""
    from safetensors import SafetensorError

    source = str(resolve_path(name))
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, UnpicklingError,
            SafetensorError) as err:  # fmt: skip
        where = (
            f"{name} ({directory})" if directory is not None and str(directory) != name else name
        )
        raise ModelNotFoundError(
            f"transformers cannot load the model in {where}: {type(err).__name__}: "
            f"{one_line(err)} (if its files are damaged: {_REDO})"
        ) from err


def _load_tokenizer_checked(name: str, directory: Path | None = None) -> Any:
    try:
        return load_tokenizer(name)
    except (ModelNotFoundError, CacheError):
        raise
    except (OSError, ValueError) as err:
        if model_kind(name) in ("embedded", "tiny", "preset"):
            cache = embedded_cache_dir()
            raise ModelNotFoundError(
                f"the embedded tokenizer in cllora's cache {cache} cannot be read "
                f"({one_line(err, 200)}); delete {cache} and run again (cllora converts it anew)"
            ) from err
        if directory is None:
            raise _not_found(name) from err
        where = name if str(directory) == name else f"{name} ({directory})"
        raise ModelNotFoundError(
            f"{where} holds a model but no usable tokenizer (tokenizer.json or "
            f"tokenizer_config.json): {one_line(err, 200)}; save the tokenizer there too "
            "(tokenizer.save_pretrained)"
        ) from err


def _not_found(name: str) -> ModelNotFoundError:
    import difflib

    from huggingface_hub import constants

    known = [EMBEDDED_NAME, *("tiny-" + f for f in TINY_FAMILIES), *PRESETS]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ModelNotFoundError(
        f"model {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        f"is neither the embedded '{EMBEDDED_NAME}', a tiny-* test model "
        f"({', '.join('tiny-' + f for f in TINY_FAMILIES)}), a preset ({', '.join(PRESETS)}) "
        "nor a local directory. cllora never downloads at run time: fetch it first "
        f"(`hf download {name}`) or pass the path of a model directory.{hint}"
    )
