"""CPU allocator policy (cllora/model/cpu_memory.py): page-aligned big buffers against glibc's
heap fragmentation (the CLI's default), and train.release_memory (freed buffers back to the OS).

Both are process-wide (torch reads its variable once, at its first allocation), so the checks
that need them run in a fresh Python process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from cllora.model.cpu_memory import ALIGN_ENV, align_large_buffers, glibc

pytestmark = pytest.mark.skipif(glibc() is None, reason="glibc (Linux) only")

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


# A checkpointed step in miniature: 24 "layers" each keep their input and free two bigger
# temporaries, then the backward frees the inputs in reverse while making new temporaries. The
# live bytes peak at ~155 MiB. With torch's default 64-byte alignment glibc's heap grows to
# ~290 MiB: the slivers posix_memalign cuts off each block's front sit in the tcache / fast
# bins, which never coalesce, so freed temporaries cannot merge. Page alignment: ~156 MiB.
FRAGMENT = """
import ctypes, sys
from cllora.model.cpu_memory import align_large_buffers, buffers_page_aligned
if sys.argv[1] == "align":
    assert align_large_buffers()
import torch

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
footprint = live = 0

def sample():
    global footprint, live
    m = libc.mallinfo2()
    footprint, live = max(footprint, m.arena + m.hblkhd), max(live, m.uordblks + m.hblkhd)

T, H, I = 1024, 576, 1536
x, saved = torch.randn(T, H), []
for _ in range(24):
    a, b = torch.randn(T, I), torch.randn(T, I)
    y = (torch.nn.functional.silu(a) * b)[:, :H] + x
    sample()
    del a, b
    saved.append(x)
    x = y
while saved:
    s = saved.pop()
    g = torch.randn(T, I)
    h = g[:, :H] * s
    sample()
    del g, h, s
print(buffers_page_aligned(), footprint / live)
"""


def _fragment(mode: str) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if k != ALIGN_ENV}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRAGMENT), mode],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.split()  # fmt: skip
    return out[0] == "True", float(out[1])


def test_page_aligned_buffers_keep_the_heap_from_fragmenting():
    aligned, ratio = _fragment("align")
    assert aligned
    assert ratio < 1.2, f"heap + mappings peaked at {ratio:.2f}x the live bytes"
    aligned, ratio = _fragment("default")
    assert not aligned
    assert ratio > 1.5  # the control: glibc's fragmentation that the setting removes


def test_align_large_buffers_leaves_a_users_choice_alone(monkeypatch):
    child: dict[str, str] = {}
    assert align_large_buffers(child) and child == {ALIGN_ENV: "1"}
    child = {ALIGN_ENV: "0"}
    assert not align_large_buffers(child) and child == {ALIGN_ENV: "0"}
    # this process imported torch already: too late, and os.environ is left as it was
    monkeypatch.delenv(ALIGN_ENV, raising=False)
    assert not align_large_buffers()
    assert ALIGN_ENV not in os.environ


@pytest.mark.parametrize("checkpointing", [True, False])
def test_cli_run_aligns_buffers_of_checkpointed_runs(tmp_path, checkpointing):
    from tests.conftest import tiny_run_overrides

    env = {k: v for k, v in os.environ.items() if k != ALIGN_ENV}
    argv = tiny_run_overrides(
        tmp_path, fed__rounds=1, train__local_steps=1, train__checkpointing=checkpointing
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cllora", "run", *argv],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "page-aligned" if checkpointing else "64-byte aligned"
    assert f"cpu buffers {expected}" in proc.stderr
