"""A model that cannot be loaded ends in one ModelNotFoundError line: the cause and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from cllora.config import ModelConfig
from cllora.model.load import ModelNotFoundError, load_model, safetensors_problem


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory, smol_tokenizer):
    """A complete local model directory: a tiny random Llama, its config and the tokenizer."""
    model, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"))
    path = tmp_path_factory.mktemp("models") / "good"
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def _copy(good_dir, tmp_path, drop=()):
    path = tmp_path / "model"
    shutil.copytree(good_dir, path)
    for name in drop:
        (path / name).unlink()
    return path


def _error(name: str) -> str:
    with pytest.raises(ModelNotFoundError) as info:
        load_model(ModelConfig(name=str(name), dtype="fp32"))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_directory_with_only_a_config(good_dir, tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    shutil.copy(good_dir / "config.json", path)
    message = _error(path)
    assert message.startswith(f"{path} holds config.json but no weights")
    assert "save_pretrained" in message and "download" not in message
    assert "tokenizer" not in message  # the old message blamed the tokenizer


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"garbage" * 10, "not a safetensors file"),
        (b"", "the file is 0 bytes, too short for a safetensors header"),
        (None, "truncated: the header describes"),
    ],
)
def test_damaged_safetensors_is_named_with_the_fix(good_dir, tmp_path, content, reason):
    path = _copy(good_dir, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if content is None else content)
    message = _error(path)
    assert message.startswith(f"model.safetensors in {path} cannot be read: {reason}")
    assert message.endswith("; re-save or re-download the model")
    assert safetensors_problem(good_dir / "model.safetensors") is None


def test_index_listing_a_missing_shard(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path)
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    message = _error(path)
    assert "lists model-00002-of-00002.safetensors, which the directory lacks" in message


def test_unreadable_config_and_missing_tokenizer(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path)
    (path / "config.json").write_text("{not json")
    assert _error(path).startswith(f"config.json in {path} cannot be read")
    shutil.rmtree(path)
    path = _copy(good_dir, tmp_path, drop=["tokenizer.json", "tokenizer_config.json"])
    assert "holds a model but no usable tokenizer" in _error(path)


@pytest.mark.parametrize("name", ["/no/such/model/dir", "./no-such-dir", "~/no-such/dir/x"])
def test_missing_local_path_never_suggests_a_download(name):
    message = _error(name)
    assert message.startswith("model directory ") and "does not exist" in message
    assert "download" not in message and "Hugging Face cache" not in message


def test_a_file_is_not_a_model_directory(good_dir):
    message = _error(good_dir / "model.safetensors")
    assert message == (
        f"{good_dir / 'model.safetensors'} is a file, not a model directory; pass the directory "
        "holding config.json, the weights and the tokenizer"
    )


def test_hub_id_not_in_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    message = _error("nobody/no-such-model")
    assert "is not in the local Hugging Face cache" in message
    assert (
        "never downloads at run time" in message and "`hf download nobody/no-such-model`" in message
    )
    assert "Did you mean 'smollm2-135m'" in _error("smollm2-135M")


def test_cached_hub_id_without_weights(good_dir, tmp_path, monkeypatch):
    """A hub id whose cached snapshot has config.json only (an interrupted download)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--half"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    shutil.copy(good_dir / "config.json", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert _error("acme/half").startswith(f"{snapshot} holds config.json but no weights")


def test_cli_maps_each_to_exit_status_2(tmp_path, capsys):
    from cllora.cli import main

    code = main(["run", "model.name=/no/such/model/dir", f"out_dir={tmp_path}", "progress=false"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cllora: error: model directory /no/such/model/dir does not exist")
    assert len(err.splitlines()) == 1
