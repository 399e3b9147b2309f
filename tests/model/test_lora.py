from __future__ import annotations

import copy

import pytest
import torch

from cllora.config import ModelConfig
from cllora.model.adapter import load_adapter, save_adapter
from cllora.model.load import TINY_FAMILIES, ModelNotFoundError, load_model
from cllora.model.lora import (
    LoRALinear,
    inject_lora,
    lora_parameters,
    lora_state_dict,
    set_lora_state,
)

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request):
    model, _ = load_model(ModelConfig(name=f"tiny-{request.param}", dtype="fp32"), seed=0)
    return model


def _ids(seed: int = 0, shape=(2, 19)) -> torch.Tensor:
    return torch.randint(3, 4000, shape, generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_init_equals_base(tiny):
    x = _ids()
    base_logits = tiny(x).logits
    model = copy.deepcopy(tiny)
    targets = inject_lora(model, r=8, alpha=16, dropout=0.0)
    assert targets and all(isinstance(model.get_submodule(t), LoRALinear) for t in targets)
    assert "lm_head" not in " ".join(targets)
    torch.testing.assert_close(model(x).logits, base_logits, rtol=0, atol=0)


def test_only_adapter_params_get_gradients(tiny):
    model = copy.deepcopy(tiny)
    inject_lora(model, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    _randomize(model)  # B != 0 so A gets a gradient too
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model.train()
    model(_ids(), labels=_ids()).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert len(trainable) == 2 * 2 * model.config.num_hidden_layers


def test_cllora_adapter_loads_in_peft_with_same_logits(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    inject_lora(model, r=8, alpha=16, dropout=0.05)
    _randomize(model)
    model.eval()
    x = _ids(3)
    ours = model(x).logits
    assert (ours - tiny(x).logits).abs().max() > 1e-3  # the adapter changes the output
    save_adapter(model, tmp_path, base_model="tiny")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path).eval()
    torch.testing.assert_close(theirs(x).logits, ours, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_cllora_with_same_logits(tiny, tmp_path):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], init_lora_weights=False
    )
    theirs = peft.get_peft_model(copy.deepcopy(tiny), cfg).eval()
    x = _ids(4)
    expected = theirs(x).logits
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(tiny)
    names = load_adapter(model, tmp_path)
    assert len(names) == 2 * model.config.num_hidden_layers
    assert model.get_submodule(names[0]).scaling == pytest.approx(3.0)
    torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_mismatched_adapter_is_refused_with_names(tiny, tmp_path):
    small = copy.deepcopy(tiny)
    inject_lora(small, r=4, alpha=8)
    save_adapter(small, tmp_path)
    big = copy.deepcopy(tiny)
    inject_lora(big, r=8, alpha=8)
    with pytest.raises(ValueError, match=r"lora_A: adapter \(4, 64\) vs model \(8, 64\)"):
        load_adapter(big, tmp_path)
    partial = {k: v for k, v in lora_state_dict(big).items() if "layers.0." in k}
    with pytest.raises(ValueError, match="missing"):
        set_lora_state(big, partial)


def test_peft_features_we_do_not_implement_are_refused(tiny, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    peft.get_peft_model(copy.deepcopy(tiny), cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rsLoRA"):
        load_adapter(copy.deepcopy(tiny), tmp_path)


def test_unknown_target_module_lists_the_real_ones(tiny):
    with pytest.raises(ValueError, match="q_proj"):
        inject_lora(copy.deepcopy(tiny), r=4, alpha=8, target_modules=["qkv"])


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_model(ModelConfig(name="nobody/no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        load_model(ModelConfig(name=str(tmp_path / "empty")))


def test_local_directory_and_bf16(tiny, tmp_path, smol_tokenizer):
    tiny.save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no usable tokenizer"):
        load_model(ModelConfig(name=str(tmp_path)))
    smol_tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(ModelConfig(name=str(tmp_path), dtype="bf16"))
    assert model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token_id is not None


def test_hub_id_from_the_local_cache(tiny, smol_tokenizer, tmp_path):
    """A hub id already in the Hugging Face cache loads offline (in a fresh process whose
    HF_HUB_CACHE points at a cache laid out as huggingface_hub lays it out)."""
    import os
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "0123abcd"
    tiny.save_pretrained(snapshot)
    smol_tokenizer.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--acme--tiny-chat" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-chat" / "refs" / "main").write_text("0123abcd")
    code = (
        "from cllora.config import ModelConfig\n"
        "from cllora.model.load import load_model\n"
        "m, t = load_model(ModelConfig(name='acme/tiny-chat', dtype='fp32'))\n"
        "print(type(m).__name__, m.config.hidden_size)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "64"
