"""The Flower App directory that ``flwr run`` builds into a FAB and sends to the SuperLink.

Usage::

    from cllora.flower.app_dir import write_app
    write_app(Path("flower-app"), config="/coord/run.yaml", overrides="fed.rounds=5", nodes=3)
    # then: flwr run flower-app <superlink connection> --stream

The app holds no code of its own: its components are cllora's
:mod:`cllora.flower.server_app` and :mod:`cllora.flower.client_app`, imported from the cllora
installed on the coordinator and on every SuperNode (``pip install "cllora[flower]"`` there).
Its ``[tool.flwr.app.config]`` holds the run-config keys of :mod:`cllora.flower.server_app`
with their defaults; ``flwr run --run-config 'key=value'`` overrides them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cllora.flower.pool import FlowerSettings

NAME = "cllora-flower"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def app_config(config: str = "", overrides: str = "", **settings: Any) -> dict[str, Any]:
    """The run config of the app: the cllora config, its overrides and the Flower settings."""
    values = {k.replace("_", "-"): v for k, v in vars(FlowerSettings(**settings)).items()}
    return {"config": config, "overrides": overrides, **values}


def write_app(directory: Path, config: str = "", overrides: str = "", **settings: Any) -> Path:
    """Write ``directory/pyproject.toml`` (see the module doc); returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    run_config = "\n".join(f"{k} = {_toml_value(v)}" for k, v in
                           app_config(config, overrides, **settings).items())  # fmt: skip
    text = f"""# A Flower App running cllora (written by `cllora flower app`); run it with
#   flwr run {directory} <superlink connection> --stream
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{NAME}"
version = "1.0.0"
description = "Federated LoRA fine-tuning with cllora on Flower"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "cllora"

[tool.flwr.app.components]
serverapp = "cllora.flower.server_app:app"
clientapp = "cllora.flower.client_app:app"

[tool.flwr.app.config]
{run_config}
"""
    (directory / "pyproject.toml").write_text(text, encoding="utf-8")
    return directory
