"""Packed attention: a packed row gives the loss and LoRA gradients of its samples run one by one,
for every backend that runs here (the override hook runs each on the same inputs)."""

from __future__ import annotations

import pytest
import torch

from cllora.config import ModelConfig
from cllora.data.formatting import Sample
from cllora.model.attention import (
    available_backends,
    enable_packed_attention,
    use_backend,
    varlen_attention,
)
from cllora.model.batching import collate
from cllora.model.load import load_model
from cllora.model.lora import inject_lora, lora_modules, lora_parameters
from cllora.model.loss import IGNORE_INDEX, batch_loss_sum, lm_loss_sum
from cllora.model.packing import collate_packed, collate_packed_rows

CPU_BACKENDS = ("sdpa_segments", "sdpa_mask")


def _samples(lengths: list[int]) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(3, 2000, (n,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return out


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def lora_model(request):
    model, _ = load_model(ModelConfig(name=request.param, dtype="fp32", attn="sdpa"))
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)  # B = 0 would hide wrong gradients of A
    return model


def _one_by_one(model, samples):
    for p in lora_parameters(model):
        p.grad = None
    model.train()
    total, count = 0.0, 0
    for s in samples:
        b = collate([s], pad_id=2)
        loss, n = lm_loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss.backward()
        total, count = total + loss.detach(), count + n
    return total, count, [p.grad.clone() for p in lora_parameters(model)]


def _packed(model, batch, backend):
    for p in lora_parameters(model):
        p.grad = None
    with use_backend(backend):
        loss, n = batch_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), n, [p.grad.clone() for p in lora_parameters(model)]


def test_packed_equals_one_by_one(lora_model):
    samples = _samples([9, 17, 4, 30, 11])
    ref_loss, ref_n, ref_grads = _one_by_one(lora_model, samples)
    enable_packed_attention(lora_model)
    try:
        for backend in CPU_BACKENDS:
            for batch in (
                collate_packed(samples),
                collate_packed_rows([samples[:2], samples[2:]], 2),
            ):
                loss, n, grads = _packed(lora_model, batch, backend)
                assert n == ref_n
                torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
                for g, r in zip(grads, ref_grads, strict=True):
                    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
        # ordinary padded batches (evaluation) still work through the same attention function
        b = collate(samples, pad_id=2)
        with torch.no_grad():
            loss, n = lm_loss_sum(lora_model, b["input_ids"], b["attention_mask"], b["labels"])
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
        out = lora_model.generate(b["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 8)
    finally:
        lora_model.set_attn_implementation("sdpa")


def test_backends_agree_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 3, 20, 21, 40], dtype=torch.int32)
    q = torch.randn(40, 6, 16, generator=g)
    k, v = torch.randn(40, 2, 16, generator=g), torch.randn(40, 2, 16, generator=g)
    outs = [varlen_attention(q, k, v, cu, 19, scale=0.3, backend=b) for b in CPU_BACKENDS]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert available_backends(torch.device("cpu"), torch.float32) == list(CPU_BACKENDS)
    with pytest.raises(ValueError, match="unknown attention backend"), use_backend("nope"):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_match_sdpa_segments():
    """Every CUDA backend (flash-attn when installed, torch's varlen) against per-segment SDPA,
    forward and the q/k/v gradients, bf16, GQA 8:2, segments of 100, 200, 1 and 211 tokens."""
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 100, 300, 301, 512], dtype=torch.int32, device="cuda")
    shapes = ((512, 8, 64), (512, 2, 64), (512, 2, 64))
    q, k, v = (torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16) for s in shapes)
    grad_out = torch.randn(512, 8, 64, generator=g, device="cuda", dtype=torch.bfloat16)

    def run(backend):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = varlen_attention(*leaves, cu, 211, backend=backend)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in leaves]

    ref, ref_grads = run("sdpa_segments")
    backends = available_backends(q.device, q.dtype)[:-2]
    assert backends, "no CUDA varlen backend: torch >= 2.9 or flash-attn expected"
    for b in backends:
        out, grads = run(b)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=f"{b} forward")
        for name, got, want in zip("qkv", grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2, msg=f"{b} d{name}")
