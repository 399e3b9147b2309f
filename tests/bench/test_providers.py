"""Providers are parsed once from their names (cllora/bench/providers.py), and the benchmark and
the planner run one training step (cllora/bench/step.py): names, fields, errors, batches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cllora.bench.providers import NAMES, PROVIDERS, Provider, UnknownProvider, parse_provider
from cllora.bench.step import collate_step, training_step
from cllora.config import Config
from cllora.data.formatting import Sample

ROOT = Path(__file__).resolve().parents[2]

# the names `cllora bench --providers` has always taken, in its help's order
BENCH_NAMES = ("cllora", "cllora-nockpt", "cllora-keepattn", "cllora-lowmem", "cllora-offload",
               "cllora-4bit", "cllora-4bit-nockpt", "cllora-4bit-keepattn", "cllora-4bit-offload",
               "hf-peft", "hf-peft-4bit", "liger", "liger-4bit")  # fmt: skip


def test_the_names_users_type_are_unchanged_and_each_parses_to_its_provider():
    assert NAMES == BENCH_NAMES
    assert len(set(PROVIDERS)) == len(PROVIDERS)
    for p in PROVIDERS:
        assert parse_provider(p.name) is p


def test_a_name_means_its_fields():
    assert parse_provider("cllora-4bit-keepattn") == Provider(
        "cllora", "nf4", checkpointing=True, keep_attention=True
    )
    assert parse_provider("cllora-nockpt").checkpointing is False
    assert parse_provider("cllora-lowmem").release_memory
    assert parse_provider("cllora-4bit-offload").offload
    peft = parse_provider("hf-peft-4bit")
    assert (peft.library, peft.quant, peft.is_cllora) == ("peft", "nf4", False)
    assert [p.name for p in PROVIDERS if p.cuda_only] == [
        "cllora-offload", "cllora-4bit-offload", "liger", "liger-4bit"
    ]  # fmt: skip
    assert {p.name: p.baseline for p in PROVIDERS if p.library == "liger"} == {
        "liger": "hf-peft", "liger-4bit": "hf-peft-4bit"
    }  # fmt: skip


def test_an_unknown_name_lists_the_valid_ones():
    with pytest.raises(
        UnknownProvider, match=r"unknown provider 'cllora-8bit'; use one of cllora,"
    ):
        parse_provider("cllora-8bit")
    with pytest.raises(UnknownProvider, match=r"use one of cllora, hf-peft$"):
        parse_provider("liger", among=("cllora", "hf-peft"))


def test_the_planner_refuses_a_provider_it_does_not_model():
    from cllora.plan.step import PlanError, planned_provider

    assert planned_provider("cllora-4bit").quant == "nf4"
    with pytest.raises(PlanError, match="unknown provider 'liger'; use one of cllora, "):
        planned_provider("liger")


@pytest.mark.parametrize("name", BENCH_NAMES[:9])
def test_engine_options_are_the_providers(name):
    p = parse_provider(name)
    cfg = p.engine_options(Config())
    assert (cfg.model.attn, cfg.train.packing) == ("varlen", True)
    assert cfg.model.quant == ("nf4" if "4bit" in name.split("-") else "none")
    assert cfg.train.checkpointing == (not name.endswith("nockpt"))
    assert cfg.train.checkpoint_policy == ("keep_attention" if "keepattn" in name else "full")
    assert cfg.train.checkpoint_offload == name.endswith("offload")
    assert cfg.train.release_memory == name.endswith("lowmem")


def test_no_provider_name_is_parsed_anywhere_else():
    """The names are read in cllora/bench/providers.py only: no prefix or suffix tests of a
    provider's name in the package or the benchmark scripts."""
    pattern = re.compile(r"""startswith\("(cllora|hf|liger)|endswith\("-|"-4bit" in""")
    files = [*(ROOT / "cllora").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    found = [
        f"{f.relative_to(ROOT)}:{i}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


def _samples(lengths: list[int]) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    return [Sample(r, list(r)) for r in (torch.randint(3, 200, (n,), generator=g).tolist()
                                         for n in lengths)]  # fmt: skip


def test_a_cllora_step_packs_and_a_peft_step_pads():
    fixed, real = _samples([8, 8]), _samples([5, 9, 3])
    rows = collate_step(parse_provider("cllora"), fixed)
    assert rows["input_ids"].shape == (2, 8)  # one row per sequence
    packed = collate_step(parse_provider("cllora-4bit"), real)
    assert packed["input_ids"].shape == (1, 17)  # every sample in one row
    padded = collate_step(parse_provider("hf-peft"), real)
    assert padded["input_ids"].shape == (3, 9)


@pytest.mark.parametrize("name", ["cllora", "hf-peft"])
def test_the_training_step_runs_the_providers_loss_and_backward(name):
    """training_step's closure gives the gradients of the provider's mean token loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    provider = parse_provider(name)
    batch = collate_step(provider, _samples([8, 8]))
    training_step(provider, model, batch)()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    torch.nn.functional.cross_entropy(logits.reshape(-1, 200), targets.reshape(-1)).backward()
    torch.testing.assert_close(got, model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
