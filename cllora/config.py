"""Run configuration: dataclasses that hold every default, overridden by YAML and ``key=value``.

Usage::

    from cllora.config import load_config, save_config

    cfg = load_config("examples/demo.yaml", ["train.lr=5e-4", "fed.rounds=2"])
    cfg.train.lr          # 0.0005
    save_config(cfg, run_dir / "config.yaml")

Precedence: dataclass defaults < YAML file < ``key=value`` overrides (values are parsed as YAML,
so ``lora.target_modules=[q_proj,v_proj]`` gives a list). Every key is validated: an unknown key
or a bad value raises :class:`ConfigError` naming the key and what is allowed. The reference of
all keys is in docs/config.md (``cllora config --keys``); ``cllora config`` prints the resolved
config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cllora.registry import algorithm_names


class ConfigError(ValueError):
    """A config key that does not exist or a value it does not allow."""


@dataclass
class ModelConfig:
    # "smollm2-135m" (embedded), "tiny-llama" / "tiny-qwen2" / "tiny-mistral" (random, for tests),
    # a preset architecture with random weights for benchmarks ("llama-3.1-8b", "qwen2.5-7b",
    # ...; cllora/model/presets.py), a local Hugging Face model directory, or a hub id already in
    # the local HF cache.
    name: str = "smollm2-135m"
    # "auto": bf16 on CUDA, fp32 on CPU (a CPU without native bf16 runs bf16 steps far slower:
    # benchmarks/results/e2e-cpu.md).
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # "auto": the first CUDA device when there is one, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "varlen": cllora's attention (cllora/model/attention.py), required by train.packing; padded
    # batches, evaluation and generate() go through it too.
    attn: Literal["sdpa", "eager", "varlen"] = "sdpa"
    # Forces one varlen backend ("auto": flash-attn, then torch's varlen on CUDA, SDPA per
    # segment on CPU).
    attn_backend: Literal["auto", "flash_attn", "torch_varlen", "sdpa_segments", "sdpa_mask"] = (
        "auto"
    )
    # 4-bit base weights with bitsandbytes (QLoRA), CPU or CUDA; the LM head stays dense.
    quant: Literal["none", "nf4", "fp4"] = "none"
    # Quantize the 4-bit blocks' absmax statistics too (saves ~0.4 bits per weight).
    double_quant: bool = True
    # Fused kernels (cllora/model/kernels.py): "auto" = RMSNorm and SwiGLU swapped for
    # Llama/Qwen2/Mistral models: Triton on CUDA, on CPU the memory-lean autograd Functions of
    # cllora_kernels.lean (fewer kept buffers); true = those plus the fused LoRA linear (not in
    # auto: slower than the unfused path so far), also on CPU (reference path); false = none.
    # Measurements: kernels/README.md (GPU), benchmarks/results/e2e-cpu.md (CPU).
    kernels: Literal["auto"] | bool = "auto"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # "all-linear" (every nn.Linear in the decoder layers, never the LM head) or a list of
    # module-name suffixes such as [q_proj, v_proj].
    target_modules: str | list[str] = "all-linear"
    # Heterogeneous ranks: client i trains rank client_ranks[i % len] (empty = every client
    # trains rank r). The global adapter keeps rank r under `exact` (SVD re-factoring) and grows
    # to the largest rank under the FedAvg family (zero-padding); a client whose rank is below
    # the global one receives the global adapter truncated to its rank by SVD.
    client_ranks: list[int] = field(default_factory=list)


@dataclass
class DataConfig:
    # "builtin" (Python's own documentation, ships with Python), a file, or a directory of files.
    path: str = "builtin"
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"
    # Record shape; "auto" detects question/answer, instruction/input/output, messages, text.
    shape: Literal["auto", "qa", "alpaca", "messages", "text"] = "auto"
    # Explicit field mapping for the chosen shape, e.g. {question: Q, answer: A}.
    fields: dict[str, str] = field(default_factory=dict)
    max_length: int = 256
    # What to do with a sample longer than max_length tokens (counted and reported either way).
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    # Loss on the response tokens only (True) or on every token (False).
    response_only: bool = True
    # A malformed record (bad JSON, missing fields): stop with its file:line, or skip it and warn.
    on_malformed: Literal["error", "skip"] = "error"
    # Optional cap on the number of records read (a seeded random subset), 0 = all.
    max_records: int = 0
    # Per-client context windows in tokens: client i uses client_max_length[i % len] (empty =
    # every client uses max_length). Applied after partitioning, with the `overlong` policy.
    client_max_length: list[int] = field(default_factory=list)


@dataclass
class PartitionConfig:
    # "field": one client per distinct value of `field` (natural data owners);
    # "iid": records shuffled and dealt evenly to `num_clients` clients;
    # "dirichlet": `num_clients` clients whose length mix (alpha_len) and/or size (alpha_qty)
    # are drawn from Dirichlet distributions (see cllora/data/partition.py);
    # "pathological": client k holds length bucket k % B only (needs partition.pool > 0).
    method: Literal["field", "iid", "dirichlet", "pathological"] = "field"
    field: str = "source"
    num_clients: int = 4
    # Dirichlet concentration of each client's mix over the length buckets (small = each
    # client sees mostly one length range; large = near-IID); empty = the global mix.
    alpha_len: float | None = None
    # Dirichlet concentration of the clients' shares of the samples (small = a few clients hold
    # most samples); empty = equal shares.
    alpha_qty: float | None = None
    # The per-sample measure the length buckets are made of: "tokens" (the sample's measured
    # token length) or "sentences" (the sentences of its response, the assistant turns or the
    # text: cllora/data/sentences.py). Both kept through corruption and windows.
    length_measure: Literal["tokens", "sentences"] = "tokens"
    # Length bucket edges in the unit of length_measure, e.g. [128, 256, 512] ->
    # [0,128) [128,256) [256,512) [512,inf); used by alpha_len, the per-client tables (tv_len,
    # hist) and the per-bucket evaluation. Empty = the quartiles of the samples' measures.
    length_buckets: list[int] = dataclasses.field(default_factory=list)
    test_fraction: float = 0.1
    # The global test set. 0: the union of the clients' test sets. > 0: this fraction of all
    # samples (at least one) is held out before partitioning, drawn with `seed` alone, so every
    # cell of a sweep over partition / quality / window settings evaluates its global and local
    # models on the same samples (cllora/data/pipeline.py).
    global_test_fraction: float = 0.0
    # Caps per client (0 = no cap); keep CPU runs short. `max_global_test` caps the held-out
    # global test set (the first samples of the same seeded draw).
    max_train_per_client: int = 0
    max_test_per_client: int = 0
    max_global_test: int = 0
    # Common random numbers for studies (cllora/data/pool.py). > 0: per seed, one training pool
    # of this many samples, drawn with `seed` alone from the samples that fit data.max_length
    # (none is truncated) and that are not held out; every run of the seed trains on exactly
    # these samples, and partition settings only decide which client holds which. Clients
    # have no own test sets (evaluate on the held-out set); `field` groups its values into
    # `num_clients` clients. 0: the classic partition of all samples.
    pool: int = 0
    # Which draw of the allocation (pool mode): two runs that differ only here hold the same
    # design drawn twice (an A/A negative control).
    draw: int = 0


@dataclass
class QualityConfig:
    # Corruption of the clients' training samples (test sets stay clean). Client i corrupts a
    # fraction rates[i % len] of its training samples; empty rates = rates drawn from the
    # Dirichlet `alpha` around `mean_rate` (no alpha: every client mean_rate).
    rates: list[float] = field(default_factory=list)
    mean_rate: float = 0.0
    alpha: float | None = None
    # Operators a corrupted sample gets one of (seeded choice): shuffle, replace, swap,
    # truncate, boilerplate (documented in cllora/data/quality.py).
    operators: list[str] = field(
        default_factory=lambda: ["shuffle", "replace", "swap", "truncate", "boilerplate"]
    )
    # Fraction of a corrupted response that replace / truncate / boilerplate change.
    strength: float = 0.5
    # Training samples per client scored by the base model (the label-free quality score).
    score_samples: int = 16
    # true: the samples chosen for corruption are dropped instead (the client trains on its
    # clean samples only): separates "noise hurts" from "fewer clean samples".
    drop: bool = False


@dataclass
class EvalConfig:
    # Evaluate every local model (after local training, before aggregation) on its own test set
    # and on the global test set: every round, or only in the last round ("last": the final
    # local models, which is what a comparison of algorithms reads, at a fraction of the cost).
    local: bool = True
    local_rounds: Literal["every", "last"] = "every"
    # The global model: every round, or only at round 0 (fed.eval_initial) and the last round
    # ("last": the rounds between get no global_eval records and NaN in summary.csv).
    global_rounds: Literal["every", "last"] = "every"
    # Local models on the held-out global test set: its first N samples (0 = all of it). The
    # same N samples for every local model and every cell of a seed (the held-out draw is
    # seeded), so they compare; needs partition.global_test_fraction > 0.
    local_global_samples: int = 0
    # Greedy answers of the global model to the first N samples of the global test set, scored
    # against the reference (ROUGE-L, token F1; cllora/generation.py) at round 0 (with
    # fed.eval_initial) and at the last round; 0 = off. The same N samples in every cell of a
    # seed when the global test set is held out (partition.global_test_fraction > 0).
    generate_samples: int = 0
    # At most this many new tokens per answer (greedy decoding stops earlier at end-of-sequence).
    max_new_tokens: int = 64
    # Directory of the initial model's per-sample losses shared by runs (cllora/eval_cache.py):
    # the quality score and the round-0 evaluation read samples evaluated before by the same
    # model. None: off for `cllora run`, <sweep>/base_cache for a sweep's cells; "" = off.
    base_cache: str | None = None


@dataclass
class TrainConfig:
    local_steps: int = 8
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_batch_size: int = 8
    # One row per step, the step's samples back to back without padding, attention kept inside
    # each sample (needs model.attn=varlen). Same samples, same loss as padding, fewer tokens.
    packing: bool = False
    # Gradient checkpointing of every `checkpoint_every`-th decoder layer; `checkpoint_offload`
    # keeps the saved layer inputs in pinned CPU memory (CUDA only). `checkpoint_policy`: "full"
    # recomputes the whole layer in the backward; "keep_attention" keeps each layer's attention
    # output (one more hidden-size tensor per layer) so the recompute skips the attention kernel,
    # whose cost grows with the square of the sequence length (cllora/model/checkpointing.py).
    checkpointing: bool = False
    checkpoint_every: int = 1
    checkpoint_offload: bool = False
    checkpoint_policy: Literal["full", "keep_attention"] = "full"
    # LM-head cross-entropy: "plain" forms the (targets x vocab) logits; "chunked" keeps at most
    # loss_chunk x vocab of them (torch); "fused" is the Triton kernel on CUDA (the chunked
    # reference on CPU); "auto" = fused on CUDA or past 16M logits, plain otherwise.
    loss: Literal["auto", "plain", "chunked", "fused"] = "auto"
    # Target rows per chunk (0 = automatic: 1024 for chunked; for fused, on CUDA a chunk whose
    # logits are about as large as the hidden states, on CPU about 16M logits: 256 rows here).
    loss_chunk: int = 0
    # CPU (glibc) only: hand every freed buffer of 128 KiB or more back to the OS at once
    # (cllora/model/cpu_memory.py), so the peak RSS follows the live activations instead of
    # glibc's fragmented heap: the longest contexts on a RAM budget, for more time per step
    # (page faults; benchmarks/results/e2e-cpu.md, provider cllora-lowmem).
    release_memory: bool = False
    # torch CPU threads (0 = leave torch's default).
    threads: int = 0


@dataclass
class FedConfig:
    rounds: int = 3
    # Fraction of the clients sampled each round (at least one client).
    sample_fraction: float = 1.0
    # The federated algorithm: one file of cllora/fed/algorithms/ each (docs/config.md,
    # "Algorithms").
    strategy: str = "fedavg"
    # How clients are weighted in the aggregate: by training samples, by training tokens, by the
    # measured quality score (1 / perplexity of the initial model on the client's responses).
    weighting: Literal["samples", "tokens", "quality", "uniform"] = "samples"
    prox_mu: float = 0.01
    # Server learning rate; empty = 1.0 for fedavgm, 0.01 for the adaptive server optimizers.
    server_lr: float | None = None
    server_momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    # The run stops (with a checkpoint of the last complete round) when fewer clients than this
    # finish a round's local training.
    min_clients: int = 1
    # Simulated client failures: the probability that a sampled client crashes halfway through
    # its local training in a round (seeded), to study and test robustness to dropped clients.
    client_failure_rate: float = 0.0
    # Evaluate the global model before the first round (round 0).
    eval_initial: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    out_dir: str = "runs"
    # Run directory name under out_dir; empty = "<timestamp>".
    run_name: str = ""
    progress: bool = True


# Range checks that a type alone cannot express: key -> (predicate, what is allowed).
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "lora.r": (lambda v: v >= 1, "an integer >= 1"),
    "lora.alpha": (lambda v: v > 0, "a number > 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "data.max_length": (lambda v: v >= 8, "an integer >= 8"),
    "data.max_records": (lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    "partition.num_clients": (lambda v: v >= 1, "an integer >= 1"),
    "partition.test_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "partition.global_test_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "partition.max_train_per_client": (lambda v: v >= 0, "an integer >= 0 (0 = no cap)"),
    "partition.max_test_per_client": (lambda v: v >= 0, "an integer >= 0 (0 = no cap)"),
    "partition.max_global_test": (lambda v: v >= 0, "an integer >= 0 (0 = no cap)"),
    "eval.local_global_samples": (lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    "eval.generate_samples": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "eval.max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "train.local_steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.lr": (lambda v: v > 0, "a number > 0"),
    "train.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "train.grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "train.eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.threads": (lambda v: v >= 0, "an integer >= 0 (0 = torch default)"),
    "train.checkpoint_every": (lambda v: v >= 1, "an integer >= 1"),
    "train.loss_chunk": (lambda v: v >= 0, "an integer >= 0 (0 = automatic)"),
    "fed.rounds": (lambda v: v >= 1, "an integer >= 1"),
    "fed.strategy": (
        lambda v: v in algorithm_names(),
        "one of " + ", ".join(repr(n) for n in algorithm_names()),
    ),
    "fed.sample_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "fed.prox_mu": (lambda v: v >= 0, "a number >= 0"),
    "fed.server_lr": (lambda v: v is None or v > 0, "a number > 0, or empty for the default"),
    "fed.server_momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "fed.beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "fed.beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "fed.tau": (lambda v: v > 0, "a number > 0"),
    "fed.min_clients": (lambda v: v >= 1, "an integer >= 1"),
    "fed.client_failure_rate": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "lora.client_ranks": (lambda v: all(r >= 1 for r in v), "a list of integers >= 1"),
    "data.client_max_length": (lambda v: all(n >= 8 for n in v), "a list of integers >= 8"),
    "partition.alpha_len": (lambda v: v is None or v > 0, "a number > 0, or empty (off)"),
    "partition.alpha_qty": (lambda v: v is None or v > 0, "a number > 0, or empty (off)"),
    "partition.pool": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "partition.draw": (lambda v: v >= 0, "an integer >= 0"),
    "partition.length_buckets": (
        lambda v: all(e >= 1 for e in v) and v == sorted(set(v)),
        "a strictly increasing list of integers >= 1",
    ),
    "quality.rates": (lambda v: all(0 <= r <= 1 for r in v), "a list of numbers in [0, 1]"),
    "quality.mean_rate": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "quality.alpha": (lambda v: v is None or v > 0, "a number > 0, or empty (off)"),
    "quality.strength": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "quality.score_samples": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of strings to strings"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, "empty (null)" if tp is type(None) else str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': got {value!r}; allowed: {_describe(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(key, v, typing.get_args(tp)[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise bad
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        number = None
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        if number is None:
            raise bad
        if not math.isfinite(number):  # .inf / .nan would train a non-finite model
            raise ConfigError(f"config key '{key}': got {value!r}; allowed: a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _unknown(key: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; allowed here: {', '.join(allowed)}")


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested mapping of updates onto dataclass ``obj`` in place, validating each key."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(key, names)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give it a mapping of keys")
            _merge(current, value, key + ".")
            continue
        setattr(obj, name, _coerce(key, value, hints[name]))


def _check_ranges(cfg: Config) -> None:
    for key, (ok, allowed) in _RANGES.items():
        value = get_key(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key '{key}': got {value!r}; allowed: {allowed}")
    if isinstance(cfg.lora.target_modules, str) and cfg.lora.target_modules != "all-linear":
        raise ConfigError(
            f"config key 'lora.target_modules': got {cfg.lora.target_modules!r}; allowed: "
            "'all-linear' or a list of module names such as [q_proj, v_proj]"
        )
    if isinstance(cfg.lora.target_modules, list) and not cfg.lora.target_modules:
        raise ConfigError("config key 'lora.target_modules': the list is empty")
    if cfg.run_name:
        check_dir_name("run_name", cfg.run_name)
    if not cfg.out_dir.strip():
        raise ConfigError("config key 'out_dir' is empty; give a directory such as runs")
    _check_measurement(cfg)


def check_dir_name(key: str, name: str) -> None:
    """``name`` must be one directory name under ``out_dir`` (no separator, not ``.`` / ``..``,
    not absolute): a run or sweep never writes, nor deletes, outside ``out_dir``."""
    bad = (
        name != name.strip()
        or name in (".", "..")
        or any(sep in name for sep in ("/", "\\", "\0"))
        or Path(name).is_absolute()
    )
    if bad:
        raise ConfigError(
            f"config key '{key}': got {name!r}; allowed: one directory name inside out_dir "
            "(no '/', '\\', '..' or surrounding spaces); set out_dir to write elsewhere"
        )


OPERATORS = ("shuffle", "replace", "swap", "truncate", "boilerplate")


def _check_measurement(cfg: Config) -> None:
    """Partition and quality settings that are only meaningful together."""
    p, q = cfg.partition, cfg.quality
    if p.method == "dirichlet" and p.alpha_len is None and p.alpha_qty is None:
        raise ConfigError(
            "partition.method=dirichlet needs partition.alpha_len and/or partition.alpha_qty "
            "(numbers > 0); use partition.method=iid for an even random split"
        )
    if p.method != "dirichlet" and (p.alpha_len is not None or p.alpha_qty is not None):
        raise ConfigError(
            f"partition.alpha_len / alpha_qty need partition.method=dirichlet (got {p.method!r})"
        )
    if p.method == "pathological" and not p.pool:
        raise ConfigError(
            "partition.method=pathological needs partition.pool > 0 (the common training pool "
            "whose length buckets the clients take one each)"
        )
    if p.pool and not p.global_test_fraction:
        raise ConfigError(
            "partition.pool needs a held-out set: set partition.global_test_fraction > 0 "
            "(clients in pool mode have no own test sets)"
        )
    if cfg.eval.local_global_samples and not p.global_test_fraction:
        raise ConfigError(
            "eval.local_global_samples needs a held-out global test set: set "
            "partition.global_test_fraction > 0 (or eval.local_global_samples=0)"
        )
    bad = [op for op in q.operators if op not in OPERATORS]
    if bad or not q.operators:
        raise ConfigError(
            f"config key 'quality.operators': got {q.operators!r}; allowed: a non-empty list "
            f"of {', '.join(OPERATORS)}"
        )
    if q.rates and (q.alpha is not None or q.mean_rate):
        raise ConfigError(
            "quality.rates (explicit per-client rates) excludes quality.mean_rate / quality.alpha"
            " (Dirichlet-drawn rates): set one or the other"
        )


def get_key(cfg: Config, key: str) -> Any:
    """Value of a dotted key such as ``"train.lr"``."""
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-3", "fed.rounds=2"]`` into a nested mapping (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.lr=1e-3)"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); quote "
                "it or fix it"
            ) from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def config_from_dict(updates: dict[str, Any] | None = None) -> Config:
    """Defaults updated by a nested mapping (as read from YAML), validated."""
    cfg = Config()
    if updates:
        if not isinstance(updates, dict):
            raise ConfigError("the config must be a mapping of sections (model:, data:, ...)")
        _merge(cfg, updates)
    _check_ranges(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file at ``path`` < ``key=value`` overrides; validated."""
    merged: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = read_yaml(path, "config file") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the config must be a mapping of sections (model:, data:, ...)"
            )
        if "sweep" in loaded:
            raise ConfigError(
                f"{path} is a sweep file (it has a 'sweep:' section): run it with 'cllora sweep'"
            )
        merged = loaded
    cfg = config_from_dict(merged)
    if overrides:
        _merge(cfg, parse_overrides(overrides))
        _check_ranges(cfg)
    return cfg


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The one-line reason of a YAML error (its problem, or its text's first line)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return f"{context}, {problem}" if context else problem


def read_yaml(path: Path, what: str = "YAML file") -> Any:
    """The parsed YAML of ``path``; a missing, unreadable or malformed file is a ConfigError that
    names ``file:line:column`` of a syntax error."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start}); save the {what} as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what}: {err.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(
            f"{where}: YAML syntax error: {_yaml_problem(err)}; fix the file"
        ) from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the resolved config (what is written to ``config.yaml``)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; ``load_config(path)`` reads it back to an equal Config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
