"""Gradient checkpointing per decoder layer gives the gradients of the plain model."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cllora.config import ModelConfig
from cllora.data.formatting import Sample
from cllora.model.attention import enable_packed_attention
from cllora.model.checkpointing import (
    disable_checkpointing,
    enable_checkpointing,
    is_checkpointing,
    keeps_output,
)
from cllora.model.load import load_model
from cllora.model.lora import inject_lora, lora_modules, lora_parameters
from cllora.model.loss import batch_loss_sum, lm_loss_sum
from cllora.model.packing import collate_packed


def _grads(model, fn):
    for p in lora_parameters(model):
        p.grad = None
    model.train()
    loss, n = fn()
    (loss / n).backward()
    model.eval()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize(("every_n_layers", "keep_attention"), [(1, False), (2, False), (1, True)])
def test_checkpointed_grads_equal_plain(every_n_layers, keep_attention):
    model, _ = load_model(ModelConfig(name="tiny-mistral", dtype="fp32"))
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    ids = torch.randint(3, 2000, (2, 20), generator=torch.Generator().manual_seed(0))
    row = [
        Sample(ids[0, :7].tolist(), ids[0, :7].tolist()),
        Sample(ids[1].tolist(), ids[1].tolist()),
    ]

    def padded():
        return lm_loss_sum(model, ids, torch.ones_like(ids), ids)

    def packed():
        return batch_loss_sum(model, collate_packed(row))

    enable_packed_attention(model)
    refs = [_grads(model, padded), _grads(model, packed)]
    enable_checkpointing(model, every_n_layers=every_n_layers, keep_attention=keep_attention)
    assert is_checkpointing(model)
    with pytest.warns(UserWarning, match="offload needs CUDA"):
        enable_checkpointing(
            model, offload=True, every_n_layers=every_n_layers, keep_attention=keep_attention
        )
    for fn, (ref_loss, ref_grads) in zip((padded, packed), refs, strict=True):
        loss, grads = _grads(model, fn)
        torch.testing.assert_close(loss, ref_loss)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    disable_checkpointing(model)
    assert not is_checkpointing(model)


class _CountAttentionKernels(TorchDispatchMode):
    """Counts the forward attention kernels that really run. Entered before the step, this mode
    sits under the one selective checkpointing pushes, so a kernel call that checkpointing
    answers from its cache never reaches it (torch's profiler would still record that call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += keeps_output(func)
        return func(*args, **(kwargs or {}))


def _attention_kernel_calls(model, fn) -> int:
    """How many times a step (forward + backward) runs a forward attention kernel."""
    with _CountAttentionKernels() as counter:
        _grads(model, fn)
    return counter.calls


@pytest.mark.parametrize("packed", [False, True])
def test_keep_attention_skips_the_attention_recompute(packed):
    """Full checkpointing runs each layer's attention kernel twice per step (forward, recompute);
    ``keep_attention`` once, as without checkpointing; everything else is still recomputed."""
    model, _ = load_model(ModelConfig(name="tiny-llama", dtype="fp32"))
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    enable_packed_attention(model)
    ids = torch.randint(3, 2000, (1, 24), generator=torch.Generator().manual_seed(1))
    if packed:
        row = [Sample(ids[0, :10].tolist(), ids[0, :10].tolist()), Sample(ids[0, 10:].tolist(),
               ids[0, 10:].tolist())]  # fmt: skip
        fn = functools.partial(batch_loss_sum, model, collate_packed(row))
    else:
        fn = functools.partial(lm_loss_sum, model, ids, torch.ones_like(ids), ids)
    plain = _attention_kernel_calls(model, fn)
    assert plain == model.config.num_hidden_layers * (2 if packed else 1)  # one per segment
    enable_checkpointing(model)
    assert _attention_kernel_calls(model, fn) == 2 * plain
    enable_checkpointing(model, keep_attention=True)
    assert _attention_kernel_calls(model, fn) == plain
    disable_checkpointing(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_offload_cuda_same_grads_less_device_memory():
    """On CUDA, ``offload=True`` moves the saved layer inputs to host memory: the gradients stay
    those of plain checkpointing and less device memory is held between forward and backward."""
    model, _ = load_model(ModelConfig(name="tiny-mistral", dtype="fp32", device="cuda"))
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    ids = torch.randint(3, 2000, (1, 1024), generator=torch.Generator().manual_seed(0)).cuda()
    layers = model.config.num_hidden_layers

    def held_after_forward(offload: bool):
        enable_checkpointing(model, offload=offload)
        for p in lora_parameters(model):
            p.grad = None
        model.train()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss, n = lm_loss_sum(model, ids, torch.ones_like(ids), ids)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        (loss / n).backward()
        model.eval()
        return held, loss.detach(), [p.grad.clone() for p in lora_parameters(model)]

    held_ckpt, ref_loss, ref_grads = held_after_forward(offload=False)
    held_off, loss, grads = held_after_forward(offload=True)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # every checkpointed layer saves its (1, 1024, hidden) fp32 input; offloaded, those are host
    layer_input = ids.numel() * model.config.hidden_size * 4
    assert held_off <= held_ckpt - (layers - 1) * layer_input, (held_off, held_ckpt, layer_input)
    disable_checkpointing(model)
