"""A run reaches for no network: a 4-bit ``cllora run`` with the network unreachable.

The run is a real process: every name lookup and connection it makes to anything but the
loopback is reported by an audit hook (``socket.getaddrinfo`` / ``socket.connect`` events), and,
where this machine lets us make a network namespace (root: CI), it runs inside one that has no
network at all. bitsandbytes 0.49-0.50 asks the Hugging Face hub for a CPU kernel when it is
imported (``cllora/model/bnb.py`` says why cllora stops that); nothing of it may be seen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import tiny_run_overrides

# Runs `cllora <argv>` (or, with --probe HOST, only looks HOST up), reporting every lookup of and
# connection to a host that is not the loopback as a "NETWORK:" line on stderr.
_HARNESS = """
import socket, sys
LOCAL = {None, "localhost", "127.0.0.1", "::1", b"localhost"}
def hook(event, args):
    if event == "socket.getaddrinfo" and args[0] not in LOCAL:
        sys.stderr.write(f"NETWORK: lookup {args[0]}:{args[1]}\\n")
    elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
        sys.stderr.write(f"NETWORK: connect {args[1]}\\n")
sys.addaudithook(hook)
if sys.argv[1] == "--probe":
    try:
        socket.getaddrinfo(sys.argv[2], 443)
    except OSError:
        pass
    sys.exit(0)
from cllora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _no_network_prefix() -> list[str]:
    """``unshare --net`` where a network namespace can be made here, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    ok = subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=30)
    return [unshare, "--net"] if ok.returncode == 0 else []


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    # the tests' own HF_HUB_OFFLINE (conftest) is not passed on: cllora must need none
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [*_no_network_prefix(), sys.executable, "-c", _HARNESS, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_the_harness_reports_a_lookup():
    """Positive control: a lookup of an outside host is reported."""
    done = _run(["--probe", "huggingface.co"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NETWORK: lookup huggingface.co:443" in done.stderr


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_a_4bit_run_reaches_for_no_network(tmp_path, quant):
    argv = tiny_run_overrides(tmp_path, fed__rounds=1, train__local_steps=1, model__quant=quant)
    done = _run(["run", *argv])
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "NETWORK:" not in output, [line for line in output.splitlines() if "NETWORK" in line]
    for alarming in ("kernels-community", "Failed to load", "pip install kernels"):
        assert alarming not in output
    assert (tmp_path / next(p.name for p in tmp_path.iterdir()) / "summary.csv").is_file()
