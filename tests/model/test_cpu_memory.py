"""train.release_memory: glibc hands freed buffers back to the OS (cllora/model/cpu_memory.py).

The allocator policy is process-wide, so each check runs in a fresh Python process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cllora.model.cpu_memory import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc (Linux) only")

# 48 blocks of 8 MiB. glibc maps the first freed big block, then moves its dynamic threshold
# past it, so by default the next ones come from the heap (mallinfo2's ``arena``), where a freed
# block may stay resident; after release_freed_memory() each is its own mapping (``hblkhd``),
# unmapped at free.
SCRIPT = """
import ctypes, sys, torch
from cllora.model.cpu_memory import release_freed_memory, rss_gib

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "release":
    assert release_freed_memory()
torch.empty(2**21).fill_(1); torch.empty(2**21)  # one mapped block freed: glibc adapts here
before, mapped = rss_gib(), libc.mallinfo2().hblkhd
big = [torch.ones(2**21) for _ in range(48)]  # 8 MiB each
peak, mapped = rss_gib(), (libc.mallinfo2().hblkhd - mapped) / 2**30
del big
print(f"{before:.4f} {peak:.4f} {rss_gib():.4f} {mapped:.4f}")
"""


def _run(mode: str) -> tuple[float, float, float, float]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), mode],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    before, peak, after, mapped = (float(x) for x in out.split())
    return before, peak, after, mapped


def test_release_maps_big_buffers_and_returns_them():
    before, peak, after, mapped = _run("release")
    assert peak - before > 0.3 and mapped > 0.3  # 384 MiB live, all of it in mappings
    assert after - before < 0.05  # and back to the OS at free
    _, _, _, mapped = _run("default")
    assert mapped < 0.05  # glibc's default put them on the heap (the reason for the option)


def test_build_model_applies_it_on_cpu():
    code = textwrap.dedent("""
        from cllora.config import Config
        from cllora.model.setup import build_model
        cfg = Config()
        cfg.model.name, cfg.model.device, cfg.train.release_memory = "tiny-llama", "cpu", True
        _, _, engine = build_model(cfg)
        print(engine.get("release_memory"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
