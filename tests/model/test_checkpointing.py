"""Gradient checkpointing per decoder layer gives the gradients of the plain model."""

from __future__ import annotations

import pytest
import torch

from cllora.config import ModelConfig
from cllora.data.formatting import Sample
from cllora.data.packing import collate_packed
from cllora.model.attention import enable_packed_attention, packed_lm_loss_sum
from cllora.model.checkpointing import disable_checkpointing, enable_checkpointing, is_checkpointing
from cllora.model.load import load_model
from cllora.model.lora import inject_lora, lora_modules, lora_parameters
from cllora.model.loss import lm_loss_sum


def _grads(model, fn):
    for p in lora_parameters(model):
        p.grad = None
    model.train()
    loss, n = fn()
    (loss / n).backward()
    model.eval()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_checkpointed_grads_equal_plain(every_n_layers):
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
        return packed_lm_loss_sum(model, collate_packed(row))

    enable_packed_attention(model)
    refs = [_grads(model, padded), _grads(model, packed)]
    enable_checkpointing(model, every_n_layers=every_n_layers)
    assert is_checkpointing(model)
    with pytest.warns(UserWarning, match="offload needs CUDA"):
        enable_checkpointing(model, offload=True, every_n_layers=every_n_layers)
    for fn, (ref_loss, ref_grads) in zip((padded, packed), refs, strict=True):
        loss, grads = _grads(model, fn)
        torch.testing.assert_close(loss, ref_loss)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    disable_checkpointing(model)
    assert not is_checkpointing(model)
