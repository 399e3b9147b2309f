"""Adapter files in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Usage::

    from cllora.model.adapter import save_adapter, load_adapter

    save_adapter(model, "runs/x/adapter", base_model="smollm2-135m")   # cllora -> PEFT dir
    load_adapter(model, "some/peft_adapter_dir")                       # PEFT dir -> cllora

    # and with PEFT itself:  peft.PeftModel.from_pretrained(base, "runs/x/adapter")

Key mapping: our ``<module>.lora_A`` is PEFT's ``base_model.model.<module>.lora_A.weight`` (PEFT
drops the adapter name ``default`` when saving; we accept it on load too). ``load_adapter`` injects
LoRA with the file's rank, alpha, dropout and target modules when the model has none yet. Files are
read with safetensors only (never pickle). Adapters that use PEFT features cllora does not
implement (rsLoRA, DoRA, per-module rank/alpha patterns, trained biases, modules_to_save) are
refused with a message naming the feature rather than loaded wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cllora.model.lora import inject_lora, lora_modules, set_lora_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


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
    """Write the model's adapter (or ``state``, e.g. an aggregate) as a PEFT adapter directory."""
    from cllora.model.lora import lora_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model) if state is None else state
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(to_peft_keys(state), str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_NAME)
    cfg = adapter_config(model, base_model)
    (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


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


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load a PEFT LoRA adapter into the model, injecting LoRA first if it has none.

    Returns the names of the LoRA modules. Shapes or module names that do not match the model are
    refused with the offending tensor names.
    """
    cfg, state = read_adapter(directory)
    if not lora_modules(model):
        targets = sorted({k.rsplit(".", 2)[-2] for k in state})
        inject_lora(
            model,
            int(cfg["r"]),
            float(cfg["lora_alpha"]),
            float(cfg.get("lora_dropout", 0.0)),
            targets,
        )
    set_lora_state(model, state)
    return list(lora_modules(model))
