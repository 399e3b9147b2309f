"""Federated algorithms, one file each; ``fed.strategy`` names the file.

Usage::

    from cllora.fed.algorithms import algorithm_names, make_algorithm
    algorithm_names()            # ('centralized', 'exact', 'fedadam', ..., 'frozen_a', ...)
    algo = make_algorithm(cfg)   # an instance of the class in cllora/fed/algorithms/<name>.py
    ignored_settings(cfg)        # ['fed.prox_mu=0.1'] when fed.strategy=fedavg (fedprox's)
    algorithm_summary("fedavg")  # '(McMahan et al., 2017) on LoRA factors: A = sum_k w_k A_k, ...'

Adding an algorithm: a file ``<name>.py`` here with one subclass of
:class:`cllora.fed.algorithms.base.Algorithm` whose ``name`` is ``<name>``, its test, and a row
of docs/config.md's algorithm table; the first paragraph of its docstring, starting with its
``name``, is what ``cllora list algorithms`` prints (:func:`algorithm_summary`).
:func:`algorithm_names` (:mod:`cllora.registry`, a leaf) lists the files without importing them,
so the config, which must not import torch nor a layer below it, can check ``fed.strategy``;
files whose name starts with ``_`` and ``base.py`` are helpers, not algorithms.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from cllora.registry import algorithm_names

if TYPE_CHECKING:
    from cllora.config import Config
    from cllora.fed.algorithms.base import Algorithm


def algorithm_class(name: str) -> type[Algorithm]:
    """The class of algorithm ``name`` (imports its file)."""
    from cllora.fed.algorithms.base import Algorithm

    if name not in algorithm_names():
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(algorithm_names())}")
    module = importlib.import_module(f"{__name__}.{name}")
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, Algorithm)
        and obj.__module__ == module.__name__
        and obj.name == name
    ]
    if len(found) != 1:
        raise TypeError(f"{module.__file__} must define one Algorithm subclass named {name!r}")
    return found[0]


def make_algorithm(cfg: Config) -> Algorithm:
    """The algorithm ``cfg.fed.strategy`` names, after its own check of ``cfg``."""
    cls = algorithm_class(cfg.fed.strategy)
    cls.check_config(cfg)
    return cls(cfg)


def ignored_settings(cfg: Config) -> list[str]:
    """The algorithm settings ``cfg`` sets away from their defaults that ``fed.strategy`` does
    not read (each algorithm's :attr:`~cllora.fed.algorithms.base.Algorithm.settings`), as
    ``fed.<key>=<value>``, for a warning: a sweep may set them for every arm."""
    from cllora.config import FedConfig

    mine = set(algorithm_class(cfg.fed.strategy).settings)
    others = {key for name in algorithm_names() for key in algorithm_class(name).settings}
    default = FedConfig()
    return [
        f"fed.{key}={getattr(cfg.fed, key)}"
        for key in sorted(others - mine)
        if getattr(cfg.fed, key) != getattr(default, key)
    ]


def algorithm_summary(name: str) -> str:
    """What algorithm ``name`` does, in one line: the first paragraph of its file's docstring
    as plain text, without the leading name (read from the file: nothing is imported)."""
    if name not in algorithm_names():
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(algorithm_names())}")
    source = (Path(__file__).parent / f"{name}.py").read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source)) or ""
    text = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
    return text[len(name) :].lstrip(": ") if text.startswith(name) else text
