"""`torchrun -m cllora run` on CPU (gloo): 2 and 3 processes give the in-process run's results;
a rank killed mid-run stops the job with the last checkpoint intact, and --resume finishes it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cllora.cli import main
from cllora.config import load_config
from cllora.fed.server import run_experiment
from cllora.model.adapter import read_adapter
from tests.conftest import metrics_without_times, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]
COMMON = dict(fed__rounds=2, fed__sample_fraction=0.8, fed__client_failure_rate=0.2,
              train__threads=1, eval__local="true")  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, argv: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_port()}", "-m", "cllora", "run", *argv]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _close(a, b, path: str = "") -> None:
    """Equal JSON trees, floats to 1e-5 relative (sharded evaluation batches differ)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_equals_the_in_process_run(tmp_path, nproc):
    ref = run_experiment(load_config(None, tiny_run_overrides(tmp_path, run_name="ref", **COMMON)))
    proc = _torchrun(nproc, tiny_run_overrides(tmp_path, run_name="dist", **COMMON))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    dist_dir = tmp_path / "dist"
    _close(metrics_without_times(dist_dir), metrics_without_times(ref.run_dir))
    (_, got), (_, want) = read_adapter(dist_dir / "adapter"), read_adapter(ref.run_dir / "adapter")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "ref"]  # one run directory


def _worker_pid(rank: int) -> int | None:
    """The pid of the torchrun worker whose environment says RANK=rank (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_") for e in env):
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker")
def test_a_dead_rank_stops_the_job_and_resume_finishes_it(tmp_path):
    common = {**COMMON, "fed__rounds": 3}
    ref = run_experiment(load_config(None, tiny_run_overrides(tmp_path, run_name="ref", **common)))
    run_dir = tmp_path / "dist"
    proc = _torchrun(2, tiny_run_overrides(tmp_path, run_name="dist", **common))
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoint" / "round-0001").exists():
        time.sleep(0.1)
    victim = _worker_pid(1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0  # the job stops with an error ...
    assert not (run_dir / "summary.csv").exists()
    assert (run_dir / "checkpoint" / "round-0001").is_dir()  # ... and the checkpoint stays
    assert main(["run", "--resume", str(run_dir)]) == 0  # finished in-process
    _close(metrics_without_times(run_dir), metrics_without_times(ref.run_dir))
