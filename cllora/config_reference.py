"""The reference of every config key: default, allowed values, meaning; one source for
``cllora config --keys`` and the "Config reference" table of docs/config.md.

Usage::

    from cllora.config_reference import config_reference, reference_markdown, reference_text

    for key, default, allowed, meaning in config_reference():
        print(key, default)          # model.name `smollm2-135m` ... progress `true`
    print(reference_markdown())      # docs/config.md's table, exactly (tests/test_docs.py)
    print(reference_text())          # what `cllora config --keys` prints

The defaults come from the dataclasses of :mod:`cllora.config` (never written twice); the
allowed values and meanings are :data:`_REFERENCE` below, in Markdown. Every key of
:class:`cllora.config.Config` must have an entry and no entry may name a key that does not exist
(:func:`config_reference` raises otherwise; tests/test_docs.py checks that docs/config.md's table
is :func:`reference_markdown` and that each ``Literal`` value of a key is named in its
"allowed"). Adding a key: its field in ``config.py``, its entry here, then
``cllora config --keys --markdown`` replaces docs/config.md's table. Links in the Markdown are
relative to docs/ (``#algorithms`` is a section of docs/config.md).
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from collections.abc import Iterator
from typing import Any

from cllora.config import Config

# key -> (allowed values, meaning), Markdown; in any order (the output follows the dataclasses)
_REFERENCE: dict[str, tuple[str, str]] = {
    "model.name": (
        "`smollm2-135m`, `tiny-llama`, `tiny-qwen2`, `tiny-mistral`, a preset "
        "(`llama-3.1-8b`, `qwen2.5-7b`, `mistral-7b-v0.3`, "
        "`smollm2-{135m,360m,1.7b}-shape`: real shapes, random weights, for benchmarks), "
        "a model directory, a hub id in the local HF cache",
        "base model (never downloaded at run time; `cllora list models` gives their sizes)",
    ),
    "model.dtype": (
        "`auto`, `fp32`, `bf16`",
        "base weights; `auto` = bf16 on CUDA, fp32 on CPU (bf16 backward is ~27x slower "
        "than fp32 on a CPU without native bf16)",
    ),
    "model.device": (
        "`auto`, `cpu`, `cuda`",
        "where the model trains; `auto` = the first CUDA device if there is one",
    ),
    "model.attn": (
        "`sdpa`, `eager`, `varlen`",
        "attention; `varlen` = cllora's packed-sequence attention (flash-attn varlen, "
        "torch varlen on CUDA, SDPA per segment on CPU), needed by `train.packing`",
    ),
    "model.attn_backend": (
        "`auto`, `flash_attn`, `torch_varlen`, `sdpa_segments`, `sdpa_mask`",
        "forces one `varlen` backend",
    ),
    "model.quant": (
        "`none`, `nf4`, `fp4`",
        "4-bit base weights with bitsandbytes (QLoRA), CPU or CUDA; the LM head stays dense",
    ),
    "model.double_quant": (
        "bool",
        "quantize the 4-bit blocks' absmax statistics too",
    ),
    "model.kernels": (
        "`auto`, `true`, `false`",
        "kernel swaps (Llama/Qwen2/Mistral): `auto` = RMSNorm and SwiGLU, Triton on CUDA "
        "and lean torch autograd Functions on CPU (`kernels/cllora_kernels/lean.py`); "
        "`true` adds the fused LoRA linear (correct, measured slower than the unfused "
        "path so far: `kernels/README.md`)",
    ),
    "lora.r": (
        ">= 1",
        "LoRA rank",
    ),
    "lora.alpha": (
        "> 0",
        "scaling is alpha / r",
    ),
    "lora.dropout": (
        "[0, 1)",
        "dropout on the LoRA branch's input",
    ),
    "lora.target_modules": (
        "`all-linear` or a list of names",
        "where LoRA goes (the LM head never)",
    ),
    "lora.client_ranks": (
        "list of ints >= 1",
        "heterogeneous ranks: client i trains `client_ranks[i % len]` "
        "([Algorithms](#algorithms), heterogeneous ranks)",
    ),
    "data.path": (
        "`builtin`, a file, a directory",
        "the records",
    ),
    "data.format": (
        "`auto`, `jsonl`, `json`, `csv`, `parquet`",
        "reader (auto = by suffix)",
    ),
    "data.shape": (
        "`auto`, `qa`, `alpaca`, `messages`, `text`",
        "record shape",
    ),
    "data.fields": (
        "mapping",
        "shape field -> record field, e.g. `{question: Q, answer: A}`",
    ),
    "data.max_length": (
        ">= 8",
        "context window in tokens",
    ),
    "data.overlong": (
        "`truncate`, `drop`, `error`",
        "a sample longer than the window (counted in the log)",
    ),
    "data.response_only": (
        "bool",
        "loss on response tokens only",
    ),
    "data.on_malformed": (
        "`error`, `skip`",
        "a malformed record (structure, bytes or fields) stops the run naming "
        "`file:line`, or is skipped and counted (`malformed_skipped` in `metrics.jsonl`)",
    ),
    "data.max_records": (
        ">= 0",
        "seeded random subset of the records (0 = all)",
    ),
    "data.client_max_length": (
        "list of integers >= 8",
        "per-client training windows, cycled over clients (empty = `data.max_length`)",
    ),
    "partition.method": (
        "`field`, `iid`, `dirichlet`, `pathological`",
        "natural owners, an even IID split, Dirichlet length/quantity skew, or (pool "
        "mode) client k holds length bucket k only",
    ),
    "partition.field": (
        "a record field",
        "the natural data owner",
    ),
    "partition.num_clients": (
        ">= 1",
        "clients of the `iid` split",
    ),
    "partition.alpha_len": (
        "> 0 or empty",
        "Dirichlet concentration of each client's length-bucket mix (`dirichlet` only; "
        "empty = the global mix)",
    ),
    "partition.alpha_qty": (
        "> 0 or empty",
        "Dirichlet concentration of client sizes (`dirichlet` only; empty = equal)",
    ),
    "partition.length_measure": (
        "tokens, sentences",
        "what the length buckets measure: a sample's tokens, or the sentences of its "
        "response (rule in `cllora/data/sentences.py`), taken before corruption and "
        "windows; drives `alpha_len`, `clients.csv` `tv_len`/`hist`, the eval `buckets` "
        "(labels `<4sent`, `4-7sent`, ...)",
    ),
    "partition.length_buckets": (
        "increasing integers >= 1",
        "bucket edges in the unit of `partition.length_measure` (empty = quartiles); an "
        "empty bucket is an error",
    ),
    "partition.test_fraction": (
        "(0, 1)",
        "each client's test share (at least one sample)",
    ),
    "partition.global_test_fraction": (
        "[0, 1)",
        "0: the global test set is the union of the clients' test sets; > 0: this share "
        "of all samples is held out before partitioning, drawn with `seed` alone, so "
        "every sweep cell is evaluated on the same global test samples",
    ),
    "partition.max_train_per_client": (
        ">= 0",
        "cap (0 = none)",
    ),
    "partition.max_test_per_client": (
        ">= 0",
        "cap (0 = none)",
    ),
    "partition.max_global_test": (
        ">= 0",
        "cap on the held-out global test set (0 = none)",
    ),
    "partition.pool": (
        ">= 0",
        "> 0: common random numbers for studies: per seed one training pool of this many "
        "samples that fit `data.max_length`, shared by every run of the seed; clients "
        "have no own test sets ([docs/measurement.md](measurement.md))",
    ),
    "partition.draw": (
        ">= 0",
        "which draw of the allocation (pool mode): two runs differing only here are an A/A control",
    ),
    "train.local_steps": (
        ">= 1",
        "local AdamW steps per client per round",
    ),
    "train.batch_size": (
        ">= 1",
        "samples per local step",
    ),
    "train.lr": (
        "> 0",
        "AdamW learning rate",
    ),
    "train.weight_decay": (
        ">= 0",
        "AdamW weight decay",
    ),
    "train.grad_clip": (
        ">= 0",
        "gradient-norm clip (0 = off)",
    ),
    "train.eval_batch_size": (
        ">= 1",
        "evaluation batch",
    ),
    "train.packing": (
        "bool",
        "one packed row per step (no padding; needs `model.attn=varlen`): same samples, same loss",
    ),
    "train.checkpointing": (
        "bool",
        "gradient checkpointing of the decoder layers",
    ),
    "train.checkpoint_every": (
        ">= 1",
        "checkpoint every n-th layer",
    ),
    "train.checkpoint_offload": (
        "bool",
        "keep the saved layer inputs in pinned CPU memory (CUDA only)",
    ),
    "train.checkpoint_policy": (
        "`full`, `keep_attention`",
        "`keep_attention`: keep each layer's attention output so the recompute skips the "
        "attention kernel (one more hidden-size tensor per layer)",
    ),
    "train.loss": (
        "`auto`, `plain`, `chunked`, `fused`",
        "LM-head cross-entropy on target positions: `plain` forms their logits, `chunked`"
        " a chunk at a time, `fused` the Triton kernel (CUDA); `auto` = fused on CUDA or "
        "past 16M logits",
    ),
    "train.loss_chunk": (
        ">= 0",
        "target rows per loss chunk (0 = automatic)",
    ),
    "train.release_memory": (
        "bool",
        "CPU (glibc): return every freed buffer to the OS at once: lowest peak RSS, "
        "slower steps (page faults); for the longest contexts under a RAM budget",
    ),
    "train.threads": (
        ">= 0",
        "torch CPU threads (0 = torch's default)",
    ),
    "fed.rounds": (
        ">= 1",
        "federated rounds",
    ),
    "fed.sample_fraction": (
        "(0, 1]",
        "clients sampled per round (at least one)",
    ),
    "fed.strategy": (
        "a name `cllora list algorithms` prints ([Algorithms](#algorithms); one file each in "
        "`cllora/fed/algorithms/`)",
        "the federated algorithm",
    ),
    "fed.weighting": (
        "`samples`, `tokens`, `quality`, `uniform`",
        "client weights in the aggregate",
    ),
    "fed.prox_mu": (
        ">= 0",
        "FedProx's proximal coefficient (strategy `fedprox`)",
    ),
    "fed.server_lr": (
        "> 0 or empty",
        "server learning rate; empty = 1.0 for `fedavgm`, 0.01 for the adaptive ones",
    ),
    "fed.server_momentum": (
        "[0, 1)",
        "FedAvgM's momentum",
    ),
    "fed.beta1": (
        "[0, 1)",
        "first-moment decay of the adaptive server optimizers",
    ),
    "fed.beta2": (
        "[0, 1)",
        "second-moment decay of the adaptive server optimizers (fedadagrad sums instead)",
    ),
    "fed.tau": (
        "> 0",
        "adaptivity epsilon of the server optimizers",
    ),
    "fed.min_clients": (
        ">= 1",
        "fewer successful clients in a round stops the run (with a checkpoint)",
    ),
    "fed.client_failure_rate": (
        "[0, 1)",
        "simulated crashes: chance a sampled client fails mid-training",
    ),
    "fed.eval_initial": (
        "bool",
        "evaluate the global model before round 1 (round 0)",
    ),
    "quality.rates": (
        "list of numbers in [0, 1]",
        "explicit per-client corruption rates (cycled)",
    ),
    "quality.mean_rate": (
        "[0, 1]",
        "mean corruption rate when rates are drawn",
    ),
    "quality.alpha": (
        "> 0 or empty",
        "Dirichlet concentration of the corruption shares (empty = every client `mean_rate`)",
    ),
    "quality.operators": (
        "`shuffle`, `replace`, `swap`, `truncate`, `boilerplate`",
        "operators a corrupted sample draws one of",
    ),
    "quality.strength": (
        "(0, 1]",
        "how much `replace` / `truncate` / `boilerplate` change",
    ),
    "quality.score_samples": (
        ">= 0",
        "training samples per client scored by the base model (0 = off)",
    ),
    "quality.drop": (
        "bool",
        "drop the samples chosen for corruption instead of corrupting them (the clean "
        "samples alone)",
    ),
    "eval.local": (
        "bool",
        "evaluate every local model each round",
    ),
    "eval.local_rounds": (
        "every, last",
        "which rounds' local models are evaluated (`last`: the final ones only)",
    ),
    "eval.global_rounds": (
        "every, last",
        "which rounds' global model is evaluated (`last`: round 0 and the last round "
        "only; the rounds between get NaN in `summary.csv`)",
    ),
    "eval.local_global_samples": (
        "integer >= 0",
        "local models read only the first N samples of the held-out global test set (0 = "
        "all; needs `partition.global_test_fraction` > 0)",
    ),
    "eval.generate_samples": (
        "integer >= 0",
        "greedy answers of the global model to the first N samples of the global test "
        "set, scored against the reference (ROUGE-L, token F1; torchmetrics) at round 0 "
        "and the last round; 0 = off",
    ),
    "eval.max_new_tokens": (
        "integer >= 1",
        "at most this many new tokens per answer (greedy decoding stops earlier at "
        "end-of-sequence)",
    ),
    "eval.base_cache": (
        'a directory, `""`',
        "per-sample losses of the initial model shared by runs (`cllora/eval_cache.py`): "
        "the round-0 evaluation and quality scores read samples the same exact model "
        "evaluated before; empty = off for `cllora run`, `<sweep>/base_cache` in a sweep;"
        ' `""` = off',
    ),
    "seed": (
        "int",
        "every random choice (LoRA init, splits, batches, sampling, dropout)",
    ),
    "out_dir": (
        "path",
        "where run directories go (created; a file or an unwritable path is an error)",
    ),
    "run_name": (
        "one directory name",
        "run directory name inside `out_dir` (no `/`, `\\`, `..`; empty = timestamp)",
    ),
    "progress": (
        "bool",
        "progress bars",
    ),
}


def config_items(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every dotted key of a config dataclass (``Config()``) with its value, in field order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from config_items(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def config_keys() -> list[str]:
    """Every dotted config key, in the dataclasses' order (``model.name``, ..., ``progress``)."""
    return [key for key, _ in config_items(Config())]


def _flow(value: Any) -> str:
    """``value`` as it is written in YAML (``true``, ``[q_proj, v_proj]``, ``{}``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if value == "":
        return '""'
    return str(value)


def format_default(value: Any) -> str:
    """The default as the docs show it: ``empty`` for None (YAML's empty value), else code."""
    return "empty" if value is None else f"`{_flow(value)}`"


def config_reference() -> list[tuple[str, str, str, str]]:
    """``(key, default, allowed, meaning)`` of every config key (Markdown text)."""
    keys = dict(config_items(Config()))
    missing = [k for k in keys if k not in _REFERENCE]
    unknown = [k for k in _REFERENCE if k not in keys]
    if missing or unknown:
        raise KeyError(f"config reference out of date: missing {missing}, unknown {unknown}")
    return [(k, format_default(v), *_REFERENCE[k]) for k, v in keys.items()]


def reference_markdown() -> str:
    """docs/config.md's config reference table."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {d} | {a} | {m} |" for k, d, a, m in config_reference()]
    return "\n".join(lines) + "\n"


def _plain(markdown: str) -> str:
    """Markdown of a cell as terminal text: no backticks; a link as its text (and its target
    when that is a file the text does not already name)."""

    def link(m: re.Match) -> str:
        label, target = m.groups()
        named = target.startswith("#") or label == target or label.endswith("/" + target)
        return label if named else f"{label} ({target})"

    return re.sub(r"\[([^\]]*)\]\(([^)]*)\)", link, markdown).replace("`", "")


def reference_text(width: int = 100) -> str:
    """Every key as ``key = default``, then its allowed values and meaning, indented."""
    blocks = []
    for key, default, allowed, meaning in config_reference():
        lines = [f"{key} = {_plain(default)}"]
        for text in (f"allowed: {_plain(allowed)}", _plain(meaning)):
            lines.append(textwrap.fill(text, width, initial_indent="    ",
                                       subsequent_indent="      "))  # fmt: skip
        blocks.append("\n".join(lines))
    return "\n".join(blocks) + "\n"
