"""Every file under ``examples/`` builds: configs validate, every sweep cell's config validates,
and the GPU study script's overrides validate on the study's sweep files (no data is read)."""

from __future__ import annotations

import re
import shlex
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


def _gpu_overrides(tmp_path: Path) -> list[str]:
    text = (ROOT / "examples" / "study" / "gpu.sh").read_text()
    block = re.search(r"^COMMON=\((.*?)^\)", text, re.S | re.M)
    assert block, "gpu.sh has no COMMON=( ... ) block"
    words = shlex.split(block.group(1), comments=True)
    subst = {"$MODEL": "smollm2-135m", "$OUT": str(tmp_path)}
    return [re.sub(r"\$MODEL|\$OUT", lambda m: subst[m.group(0)], w) for w in words]


@pytest.mark.parametrize("name", ["length", "quality", "sentences"])
def test_the_gpu_study_overrides_validate_on_every_study_sweep(tmp_path, name):
    sweep = load_sweep(ROOT / "examples" / "study" / f"{name}.yaml", _gpu_overrides(tmp_path))
    seeds = {c.cfg.seed for c in sweep.cells}
    cfg = sweep.cells[0].cfg
    assert seeds == {0, 1, 2, 3, 4} and len(sweep.cells) == 15
    assert cfg.fed.rounds >= 20 and cfg.partition.max_train_per_client >= 100
    assert cfg.partition.max_global_test >= 100
