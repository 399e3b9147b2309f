"""What cllora knows by name: its models (with their sizes) and its federated algorithms, as
``cllora list models`` / ``cllora list algorithms`` print them.

Usage::

    from cllora.catalog import algorithms_text, model_catalog, models_text

    model_catalog()[0]        # ('smollm2-135m', 'embedded', 134515008, 'SmolLM2-135M-Instruct...')
    print(models_text())      # one line per model: name, kind, parameters, what it is
    print(algorithms_text())  # one line per fed.strategy value, from its file's docstring

The models are the names :func:`cllora.model.load.load_model` knows besides a directory or a
cached hub id: the embedded model, the tiny test models and the presets of
:mod:`cllora.model.presets`; their sizes are counted from their configs
(:func:`parameter_count`, no model is built). The algorithms are the files of
:mod:`cllora.fed.algorithms` (:func:`~cllora.fed.algorithms.algorithm_summary`): nothing here
lists them a second time.
"""

from __future__ import annotations

import textwrap
from typing import Any

_EMBEDDED_ARCH = "smollm2-135m-shape"  # the embedded model's architecture, as a preset


def parameter_count(config: Any) -> int:
    """Parameters of a Llama / Qwen2 / Mistral decoder from its transformers config: embeddings,
    attention (Qwen2's q/k/v biases included), SwiGLU MLP, norms, and an untied LM head."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    attn = 2 * h * heads * d + 2 * h * kv * d  # q and o; k and v
    if config.model_type == "qwen2":
        attn += heads * d + 2 * kv * d
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + layers * (attn + 3 * h * inter + 2 * h) + h


def _shape(config: Any) -> str:
    return (
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} heads (q/kv), "
        f"vocab {config.vocab_size}, {config.max_position_embeddings} positions"
    )


def model_catalog() -> list[tuple[str, str, int, str]]:
    """``(name, kind, parameters, what)`` of every model name cllora knows."""
    from cllora.model.embedded import EMBEDDED_NAME
    from cllora.model.load import TINY_FAMILIES, tiny_config
    from cllora.model.presets import PRESETS, preset_config

    embedded = preset_config(_EMBEDDED_ARCH)
    rows = [
        (
            EMBEDDED_NAME,
            "embedded",
            parameter_count(embedded),
            "SmolLM2-135M-Instruct, real weights, ships with cllora (the default); "
            + _shape(embedded),
        )
    ]
    for family in TINY_FAMILIES:
        config = tiny_config(family, vocab_size=49152)
        rows.append(
            (
                f"tiny-{family}",
                "test",
                parameter_count(config),
                f"random weights, for tests; {_shape(config)}",
            )
        )
    for name in PRESETS:
        config = preset_config(name)
        rows.append(
            (
                name,
                "preset",
                parameter_count(config),
                f"real shapes, random weights, for benchmarks; {_shape(config)}",
            )
        )
    return rows


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def models_text(width: int = 100) -> str:
    """The model catalog as aligned lines, then what other names load."""
    rows = model_catalog()
    name_w = max(len(r[0]) for r in rows) + 2
    lines = [f"{'name':<{name_w}}{'kind':<10}{'params':>8}  what"]
    indent = " " * (name_w + 20)
    for name, kind, params, what in rows:
        head = f"{name:<{name_w}}{kind:<10}{_size(params):>8}  "
        lines.append(textwrap.fill(what, width, initial_indent=head, subsequent_indent=indent))
    lines.append(
        "\nAny other model.name: a local Hugging Face model directory, or a hub id already in "
        "the local\nHugging Face cache (cllora never downloads at run time)."
    )
    return "\n".join(lines) + "\n"


def algorithms_text(width: int = 100) -> str:
    """One line per algorithm (``fed.strategy`` value): its name and what it does."""
    from cllora.fed.algorithms import algorithm_names, algorithm_summary

    names = algorithm_names()
    name_w = max(len(n) for n in names) + 2
    lines = [
        textwrap.fill(
            algorithm_summary(n),
            width,
            initial_indent=f"{n:<{name_w}}",
            subsequent_indent=" " * name_w,
        )
        for n in names
    ]
    lines.append('\nChoose one with fed.strategy=NAME; the maths: docs/config.md, "Algorithms".')
    return "\n".join(lines) + "\n"
