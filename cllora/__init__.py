"""cllora: federated LoRA/QLoRA fine-tuning that measures how each client's context length and
quality shape the local and the global model.

Usage from Python::

    from cllora.config import load_config
    from cllora.fed.server import run_experiment

    cfg = load_config("examples/demo.yaml", ["fed.rounds=2"])
    result = run_experiment(cfg)

From the shell: ``cllora run examples/demo.yaml fed.rounds=2`` (see README.md).
"""

__version__ = "0.1.0"
