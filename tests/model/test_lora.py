from __future__ import annotations

import copy

import pytest
import torch

from cllora.config import ConfigError, ModelConfig
from cllora.model.adapter import load_adapter, save_adapter
from cllora.model.load import TINY_FAMILIES, ModelNotFoundError, load_model
from cllora.model.lora import (
    LoRALinear,
    inject_lora,
    lora_modules,
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
    state = lora_state_dict(small)
    big = copy.deepcopy(tiny)
    inject_lora(big, r=8, alpha=8)
    with pytest.raises(ValueError, match=r"lora_A: adapter \(4, 64\) vs model \(8, 64\)"):
        set_lora_state(big, state)  # load_adapter takes the adapter's rank; this does not
    key = next(iter(state))
    state[key] = state[key][:, :-1]  # an adapter of another architecture's width
    save_adapter(small, tmp_path, state=state)
    with pytest.raises(ValueError, match=r"lora_A: adapter \(4, 63\) vs model \(4, 64\)"):
        load_adapter(big, tmp_path)
    assert lora_modules(big)[key.removesuffix(".lora_A")].r == 8  # refused before any change
    partial = {k: v for k, v in lora_state_dict(big).items() if "layers.0." in k}
    with pytest.raises(ValueError, match="missing"):
        set_lora_state(big, partial)


def test_peft_features_we_do_not_implement_are_refused(tiny, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    peft.get_peft_model(copy.deepcopy(tiny), cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rsLoRA"):
        load_adapter(copy.deepcopy(tiny), tmp_path)


_LINEARS = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"


@pytest.mark.parametrize(
    "targets, unmatched",
    [
        (["qkv"], "qkv matches"),  # nothing matches
        (["q_proj", "v_prj"], "v_prj matches"),  # a typo beside a valid name
        (["q_proj", "lm_head", "mlp"], "lm_head, mlp match"),  # the LM head, not a linear
    ],
)
def test_unmatched_target_modules_are_a_config_error(tiny, targets, unmatched):
    """Any name of lora.target_modules that matches no linear module is refused, naming the
    unmatched names and the model's linear module names (deduplicated leaves)."""
    model = copy.deepcopy(tiny)
    with pytest.raises(ConfigError) as info:
        inject_lora(model, r=4, alpha=8, target_modules=targets)
    message = str(info.value)
    assert message.startswith(f"lora.target_modules=[{', '.join(targets)}]: {unmatched} no linear")
    assert f"its linear modules are {_LINEARS}: use names from that list, or all-linear" in message
    assert not lora_modules(model)  # nothing was injected


def test_target_modules_may_name_a_module_path(tiny):
    model = copy.deepcopy(tiny)
    targets = inject_lora(model, r=2, alpha=4, target_modules=["self_attn.q_proj", "down_proj"])
    assert len(targets) == 2 * model.config.num_hidden_layers


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


# ------------------------------------------------------------ the LoRA forward/backward paths


def _lora_reference(x, weight, bias, a, b, scaling):
    """The plain fp64 expression the fast paths must reproduce (values and gradients)."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scaling * (x @ a.t()) @ b.t()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["dense", "subclass"])
def test_lora_paths_match_the_plain_expression(dtype, tol, bias, kind):
    """The dense autograd Function (nn.Linear base) and the addmm path (any other base: here a
    subclass of nn.Linear, as bitsandbytes' layers are) give the plain expression's output and
    gradients for x, A and B; A and B keep fp32 gradients whatever the compute dtype."""
    g = torch.Generator().manual_seed(0)

    class OtherLinear(torch.nn.Linear):
        pass

    cls = torch.nn.Linear if kind == "dense" else OtherLinear
    base = cls(48, 40, bias=bias).to(dtype)
    m = LoRALinear(base, r=4, alpha=8.0)
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    # a non-contiguous 3D input, as attention outputs are
    x = torch.randn(7, 2, 48, generator=g).to(dtype).transpose(0, 1).requires_grad_()
    y = m(x)
    assert y.dtype == dtype and y.shape == (2, 7, 40)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    a64 = m.lora_A.detach().double().requires_grad_()
    b64 = m.lora_B.detach().double().requires_grad_()
    bias64 = base.bias.double() if bias else None
    y64 = _lora_reference(x64, base.weight.double(), bias64, a64, b64, m.scaling)
    y64.backward(dy.double())

    def rel(got, want):
        return float((got.double() - want).norm() / want.norm())

    assert rel(y.detach(), y64.detach()) < tol
    for got, want in ((x.grad, x64.grad), (m.lora_A.grad, a64.grad), (m.lora_B.grad, b64.grad)):
        assert rel(got, want) < tol
    assert m.lora_A.grad.dtype == m.lora_B.grad.dtype == torch.float32
    assert base.weight.grad is None


def test_dense_lora_keeps_only_x_and_the_rank_product():
    """What the dense path keeps for the backward: x (an input) and the (tokens x r) x A^T, not
    the (tokens x out) B product or its scaled copy."""
    base = torch.nn.Linear(64, 96)
    m = LoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(50, 64, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    own = {x, base.weight}
    extra = sum(
        n for p, n in saved.items() if p not in {t.untyped_storage().data_ptr() for t in own}
    )
    # x A^T (50 x 4) plus the small casts of A and B at most: far below one (50 x 96) tensor
    assert extra <= 50 * 4 * 4 + (4 * 64 + 96 * 4) * 4 < 50 * 96 * 4


def test_lora_dropout_takes_the_autograd_path_and_trains():
    torch.manual_seed(0)
    m = LoRALinear(torch.nn.Linear(16, 8), r=2, alpha=4.0, dropout=0.5)
    x = torch.randn(4, 16)
    m.train()
    m(x).sum().backward()
    assert m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0
    m.eval()  # in eval dropout is the identity: the dense path, deterministic
    with torch.no_grad():
        assert torch.equal(m(x), m(x))


def test_lora_under_cpu_autocast_takes_the_autograd_path():
    """Under autocast the dense Function is skipped (its backward would see autocast's dtypes
    only in the forward); the result is autocast's dtype and A, B still get fp32 grads."""
    m = LoRALinear(torch.nn.Linear(16, 8), r=2, alpha=4.0)
    with torch.no_grad():
        m.lora_B.fill_(0.1)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and m.lora_A.grad.abs().sum() > 0
