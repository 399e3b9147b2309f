from __future__ import annotations

import pytest

from cllora.config import Config, ConfigError, load_config, parse_overrides, save_config


def test_defaults_validate():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "smollm2-135m"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  local_steps: 3\nfed:\n  rounds: 5\n")
    cfg = load_config(path, ["fed.rounds=2", "lora.target_modules=[q_proj, v_proj]", "seed=7"])
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string: coerced
    assert cfg.train.local_steps == 3  # from the file
    assert cfg.fed.rounds == 2  # override beats the file
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.seed == 7
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.fields={question: Q, answer: A}", "model.dtype=fp32"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=1", ["train.lrr", "did you mean 'lr'"]),
        ("trian.lr=1", ["trian", "model", "train"]),
        ("model.dtype=fp16", ["model.dtype", "'fp32'", "'bf16'"]),
        ("lora.r=0", ["lora.r", ">= 1"]),
        ("lora.dropout=1.5", ["lora.dropout", "[0, 1)"]),
        ("train.local_steps=2.5", ["train.local_steps", "an integer"]),
        ("fed.sample_fraction=0", ["fed.sample_fraction", "(0, 1]"]),
        ("partition.global_test_fraction=1", ["partition.global_test_fraction", "[0, 1)"]),
        ("partition.max_global_test=-1", ["partition.max_global_test", ">= 0"]),
        ("data.response_only=maybe", ["data.response_only", "true or false"]),
        ("lora.target_modules=some", ["lora.target_modules", "all-linear"]),
        ("model=tiny", ["model", "section"]),
        ("train.lr", ["key=value"]),
    ],
)
def test_bad_keys_and_values_are_named(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for w in words:
        assert w in str(err.value)


def test_bad_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  max_lenght: 512\n")
    with pytest.raises(ConfigError, match=r"data\.max_lenght.*did you mean 'max_length'"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
