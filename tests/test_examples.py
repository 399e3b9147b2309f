"""Every file under ``examples/`` builds: configs validate, every sweep cell's config validates,
and the GPU study script plans three model sizes of the study's design (no data is read)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cllora.config import load_config
from cllora.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_config_validates(path):
    if "sweep" in (yaml.safe_load(path.read_text()) or {}):
        sweep = load_sweep(path)
        assert sweep.cells and len({c.name for c in sweep.cells}) == len(sweep.cells)
    else:
        load_config(str(path))


def _gpu(tmp_path: Path, *models: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(ROOT / "examples" / "study" / "gpu.sh"), "--plan-only", str(tmp_path),
         *models],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def test_the_gpu_study_plans_three_sizes_of_the_same_design(tmp_path):
    run = _gpu(tmp_path, "tiny-llama", "tiny-llama", "tiny-llama")
    assert run.returncode == 0, run.stderr
    estimates = [ln for ln in run.stdout.splitlines() if "GPU hours" in ln]
    assert len(estimates) == 3 and all("ms per step" in ln for ln in estimates)
    spec = yaml.safe_load((tmp_path / "crn-gpu.yaml").read_text())
    crn = yaml.safe_load((ROOT / "examples" / "study" / "crn.yaml").read_text())
    assert spec["sweep"]["study"] == crn["sweep"]["study"]  # the same frozen endpoints
    assert spec["sweep"]["arms"].keys() == crn["sweep"]["arms"].keys()
    sweep = load_sweep(tmp_path / "crn-gpu.yaml", ["model.name=smollm2-135m"])
    cfg = {c.values["arm"]: c.cfg for c in sweep.cells if c.values["seed"] == 0}
    steps = {a: c.fed.rounds * c.train.local_steps for a, c in cfg.items()}
    assert len(set(steps.values())) == 1, steps  # few vs many local steps at equal totals
    assert cfg["iid"].partition.pool >= 800 and cfg["iid"].data.max_length >= 1024


def test_the_gpu_study_needs_three_sizes(tmp_path):
    run = _gpu(tmp_path, "tiny-llama", "tiny-llama")
    assert run.returncode == 2 and "at least three model directories" in run.stderr


def test_the_smoke_config_is_the_quick_one_the_readme_runs():
    """examples/smoke.yaml, the README's check that an install works, stays a smoke run: the
    tiny model, a few samples, steps and rounds (validated above; this test never runs it)."""
    cfg = load_config(str(ROOT / "examples" / "smoke.yaml"))
    assert cfg.model.name.startswith("tiny-") and cfg.data.path == "builtin"
    assert 0 < cfg.partition.max_train_per_client <= 8 and cfg.partition.max_test_per_client > 0
    assert cfg.fed.rounds * cfg.train.local_steps <= 4 and cfg.data.max_length <= 128
    assert "cllora run examples/smoke.yaml" in (ROOT / "README.md").read_text()
