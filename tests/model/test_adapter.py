"""The adapter a run saves loads where users load it: PEFT's AutoPeftModelForCausalLM, offline."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cllora.config import ModelConfig, load_config
from cllora.model.adapter import CONFIG_NAME, README_NAME, load_adapter, save_adapter
from cllora.model.load import load_model, peft_base_path
from cllora.model.lora import inject_lora, lora_modules, lora_parameters
from tests.conftest import tiny_run_overrides

peft = pytest.importorskip("peft")


def _ids(seed: int = 0, shape=(2, 13)) -> torch.Tensor:
    return torch.randint(3, 4000, shape, generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _peft_logits(adapter_dir, x: torch.Tensor) -> torch.Tensor:
    model = peft.AutoPeftModelForCausalLM.from_pretrained(
        str(adapter_dir), dtype=torch.float32, local_files_only=True
    ).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.fixture
def model_dir(tmp_path, smol_tokenizer):
    """A local Hugging Face model directory: a tiny random Llama plus the embedded tokenizer."""
    base, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"), seed=3)
    path = tmp_path / "base-model"
    base.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def test_run_adapter_of_a_local_model_dir_loads_with_auto_peft(tmp_path, model_dir, monkeypatch):
    """A run on a relative model path saves an adapter whose config names the absolute path;
    PEFT loads base and adapter from it (from another working directory) with cllora's logits."""
    from cllora.fed.server import run_experiment

    monkeypatch.chdir(tmp_path)
    overrides = tiny_run_overrides(
        tmp_path, model__name="base-model", fed__rounds=1, train__local_steps=2, run_name="r"
    )
    result = run_experiment(load_config(None, overrides))
    adapter_dir = result.run_dir / "adapter"
    cfg = json.loads((adapter_dir / CONFIG_NAME).read_text())
    assert cfg["base_model_name_or_path"] == str(model_dir.resolve())
    assert "Load with PEFT" in (adapter_dir / README_NAME).read_text()

    ours, _ = load_model(ModelConfig(name=str(model_dir), dtype="fp32"))
    x = _ids()
    with torch.no_grad():
        base_logits = ours(x).logits
        load_adapter(ours, adapter_dir)
        expected = ours(x).logits
    assert (expected - base_logits).abs().max() > 1e-4  # the trained adapter changes the output
    monkeypatch.chdir(tmp_path.parent)
    torch.testing.assert_close(_peft_logits(adapter_dir, x), expected, rtol=1e-5, atol=1e-5)


def test_peft_base_path_of_each_kind_of_name(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("CLLORA_CACHE", str(tmp_path / "cache"))
    assert peft_base_path("smollm2-135m") == str(tmp_path / "cache" / "models" / "smollm2-135m")
    monkeypatch.chdir(model_dir.parent)
    assert peft_base_path(model_dir.name) == str(model_dir.resolve())
    assert peft_base_path("acme/tiny-chat") == "acme/tiny-chat"  # a hub id stays a hub id
    for name in ("tiny-llama", "tiny-qwen2", "llama-3.1-8b", ""):
        assert peft_base_path(name) == name


@pytest.mark.parametrize("name", ["tiny-llama", "llama-3.1-8b"])
def test_random_weight_bases_keep_their_name_and_say_how_to_rebuild(tmp_path, name):
    model, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"))
    inject_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    save_adapter(model, tmp_path, base_model=name)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["base_model_name_or_path"] == name
    readme = (tmp_path / README_NAME).read_text()
    assert "cannot load this adapter" in readme
    assert f'load_model(ModelConfig(name="{name}"), seed=SEED)' in readme


def test_tiny_readme_recipe_rebuilds_the_same_model(tmp_path):
    """What the README of a tiny-model adapter tells users to do gives the run's logits."""
    model, _ = load_model(ModelConfig(name="tiny-qwen2", dtype="fp32"), seed=5)
    inject_lora(model, r=4, alpha=8)
    _randomize(model)
    x = _ids(2)
    with torch.no_grad():
        expected = model(x).logits
    save_adapter(model, tmp_path, base_model="tiny-qwen2")
    rebuilt, _ = load_model(ModelConfig(name="tiny-qwen2", dtype="fp32"), seed=5)
    load_adapter(rebuilt, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).logits, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_embedded_smollm2_adapter_loads_with_auto_peft(tmp_path):
    """The embedded model's adapter names the converted local directory, which PEFT and
    transformers load offline (model and tokenizer): one forward pass each side."""
    from transformers import AutoTokenizer

    model, _ = load_model(ModelConfig(name="smollm2-135m", dtype="fp32"))
    inject_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    _randomize(model, std=0.02)
    save_adapter(model, tmp_path / "adapter", base_model="smollm2-135m")
    base_path = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())[
        "base_model_name_or_path"
    ]
    assert base_path == peft_base_path("smollm2-135m") and base_path.startswith("/")
    assert len(AutoTokenizer.from_pretrained(base_path, local_files_only=True)) == 49152
    x = _ids(7, shape=(1, 16))
    with torch.no_grad():
        expected = model(x).logits
    del model
    torch.testing.assert_close(
        _peft_logits(tmp_path / "adapter", x), expected, rtol=1e-4, atol=1e-4
    )


def _tiny(seed: int = 0, dtype: str = "fp32"):
    return load_model(ModelConfig(name="tiny-llama", dtype=dtype), seed=seed)[0]


def _peft_adapter(directory, seed: int = 0, **lora) -> torch.Tensor:
    """Save a PEFT adapter with random A and B on tiny-llama(seed); PEFT's logits on _ids(4)."""
    cfg = peft.LoraConfig(init_lora_weights=False, **lora)
    theirs = peft.get_peft_model(_tiny(seed), cfg).eval()
    with torch.no_grad():
        logits = theirs(_ids(4)).logits
    theirs.save_pretrained(directory)
    return logits


def test_loaded_adapter_is_in_eval_mode_unless_trainable(tmp_path):
    """The README's recipe (load_model, then load_adapter) infers without LoRA dropout: two
    forwards agree, and agree with PEFT; is_trainable=True gives a model to train."""
    expected = _peft_adapter(
        tmp_path, r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"]
    )
    model = _tiny()
    load_adapter(model, tmp_path)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        first, second = model(_ids(4)).logits, model(_ids(4)).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in lora_parameters(model))
    trainable = _tiny()
    load_adapter(trainable, tmp_path, is_trainable=True)
    assert all(m.training for m in lora_modules(trainable).values())
    assert all(p.requires_grad for p in lora_parameters(trainable))
    with torch.no_grad():
        assert not torch.equal(trainable(_ids(4)).logits, trainable(_ids(4)).logits)  # dropout


@pytest.mark.parametrize("r, alpha, dropout", [(4, 4.0, 0.0), (8, 16.0, 0.3)])
def test_adapter_onto_lora_of_another_config_takes_the_adapters_config(tmp_path, r, alpha, dropout):
    """A model that already carries LoRA (same modules, another alpha, rank or dropout) takes the
    adapter's rank, alpha and dropout: PEFT's logits, not the model's scaling."""
    targets = ["q_proj", "down_proj"]
    expected = _peft_adapter(tmp_path, r=4, lora_alpha=12, lora_dropout=0.1, target_modules=targets)
    model = _tiny()
    inject_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=targets)
    names = load_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids(4)).logits, expected, rtol=1e-5, atol=1e-5)
    module = model.get_submodule(names[0])
    assert (module.r, module.alpha, module.dropout.p) == (4, 12.0, 0.1)


def test_adapter_onto_lora_of_other_modules_is_refused_in_one_line(tmp_path):
    _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    model = _tiny()
    inject_lora(model, r=4, alpha=8, target_modules=["q_proj"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="onto a model without LoRA") as info:
        load_adapter(model, tmp_path)
    assert "\n" not in str(info.value) and "down_proj" in str(info.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is left as it was


def _cllora_adapter(directory, seed: int = 0) -> None:
    model = _tiny(seed)
    inject_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    _randomize(model)
    save_adapter(model, directory, base_model="tiny-llama")


def test_adapter_onto_another_base_of_the_same_shapes_is_refused(tmp_path, caplog):
    """tiny-llama built with seed 1 is not the base an adapter trained on seed 0 is for."""
    _cllora_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"trained on base 'tiny-llama'.*check_base=False") as info:
        load_adapter(_tiny(seed=1), tmp_path)
    assert "\n" not in str(info.value)
    assert load_adapter(_tiny(seed=1), tmp_path, check_base=False)  # the opt-out loads it
    with caplog.at_level(logging.WARNING, logger="cllora"):
        load_adapter(_tiny(seed=0), tmp_path)  # its own base,
        load_adapter(_tiny(seed=0, dtype="bf16"), tmp_path)  # in another dtype too
    assert not caplog.records


def test_peft_adapter_naming_another_base_warns(tmp_path, model_dir, smol_tokenizer, caplog):
    """A PEFT adapter (no cllora record of its base) whose base_model_name_or_path names another
    model directory than the model's: one warning line naming both."""
    other = tmp_path / "other-model"
    _tiny(seed=4).save_pretrained(other)
    smol_tokenizer.save_pretrained(other)
    base, _ = load_model(ModelConfig(name=str(model_dir), dtype="fp32"))
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    peft.get_peft_model(base, cfg).save_pretrained(tmp_path / "adapter")
    model, _ = load_model(ModelConfig(name=str(other), dtype="fp32"))
    with caplog.at_level(logging.WARNING, logger="cllora"):
        load_adapter(model, tmp_path / "adapter")
    [record] = caplog.records
    assert str(model_dir) in record.getMessage() and str(other) in record.getMessage()
    assert "\n" not in record.getMessage()
