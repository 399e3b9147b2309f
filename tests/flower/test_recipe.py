"""docs/flower.md's localhost deployment recipe, run as written: the shell block between its
``<!-- recipe:localhost -->`` markers, by bash, in an empty folder, with this environment's
``cllora``, ``flower-superlink``, ``flower-supernode`` and ``flwr`` on the PATH (what
``source .venv/bin/activate`` gives). It must finish, write a run directory whose results
name both sites, and show cllora's progress in ``flwr run --stream``'s output.

The recipe uses Flower's default ports (SuperLink 8000, SuperNodes 9094 and 9095), as a user
would; the test checks they are free first and fails naming the one that is not. Every process
the recipe starts is stopped when the test ends, also when it fails."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import cllora

DOC = Path(__file__).resolve().parents[2] / "docs" / "flower.md"
PORTS = (8000, 9094, 9095)


def recipe() -> str:
    """The shell block between the recipe's markers."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- recipe:localhost -->\n```bash\n(.*?)```\n<!-- /recipe:localhost -->",
                      text, flags=re.S)  # fmt: skip
    assert block, "docs/flower.md lost its recipe markers"
    return block.group(1)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_localhost_recipe_runs_as_written(tmp_path):
    busy = [p for p in PORTS if not _port_free(p)]
    assert not busy, f"the recipe's ports {busy} are taken on this machine: free them"
    bin_dir = str(Path(sys.executable).parent)
    root = str(Path(cllora.__file__).parents[1])  # the cllora under test, editable or not
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(":"),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("FLWR_HOME", None)
    proc = subprocess.Popen(["bash", "-e", "-c", recipe()], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the recipe left running
            os.killpg(proc.pid, signal.SIGKILL)
    trial = tmp_path / "trial"
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(trial.glob("*.log")))  # fmt: skip
    assert proc.returncode == 0, f"{out[-4000:]}\n{logs}"
    summaries = list((trial / "runs").glob("*/summary.csv"))
    assert len(summaries) == 1, out
    with summaries[0].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert {"loss[language]", "loss[text]"} <= set(rows[0])
    # cllora's progress, seen from `flwr run --stream`
    assert "cllora: flower: 2 SuperNodes: language, text" in out, out[-4000:]
    assert "cllora: round 1 of 2: training on" in out
    assert re.search(r"cllora: round 2 of 2: 2 of 2 trainees sent an update in \d+ s; global loss",
                     out), out[-4000:]  # fmt: skip
    assert "setup plugin" not in out
