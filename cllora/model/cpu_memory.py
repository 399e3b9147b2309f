"""Peak RSS on CPU: keep glibc's heap from fragmenting, or make it give freed buffers back.

Usage::

    from cllora.model.cpu_memory import align_large_buffers, release_freed_memory, rss_gib

    align_large_buffers()          # before `import torch` (`cllora run` does, when checkpointing)
    import torch
    if release_freed_memory():     # train.release_memory=true calls this in build_model
        ...                        # True on glibc; False (nothing changed) elsewhere

Why: torch's CPU tensors come from ``malloc``. glibc serves big blocks with ``mmap`` only until
the first such block is freed; then its *dynamic* threshold climbs (up to 32 MiB) and later
blocks of activation size come from the heap, where a freed block stays resident until
everything above it is freed too. A training step allocates and frees many (tokens x hidden)
buffers in changing orders, so the heap fragments: with checkpointing the peak RSS is set by
the heap's free space, not by the live bytes. The measurements (peak RSS, heap and live bytes
from ``mallinfo2``, one glibc setting at a time, speed) are in ``benchmarks/results/
e2e-cpu.md``, "Page-aligned CPU buffers against heap fragmentation" and, for
``release_freed_memory``, the ``cllora-lowmem`` rows of "After the LoRA, lean-kernel and
allocator work".

Two remedies:

- :func:`align_large_buffers` (``cllora run`` applies it to checkpointed runs): torch asks
  glibc for 64-byte alignment, which ``posix_memalign`` gets by carving a few dozen bytes off the
  front of each big block. Those slivers go to glibc's per-thread cache (tcache) and fast bins,
  which never coalesce, so a freed sliver pins the gap between two big blocks and freed
  activations can no longer merge into a block big enough for the next one: the heap grows.
  With ``THP_MEM_ALLOC_ENABLE=1`` torch page-aligns blocks of 2 MiB and more (and advises the
  kernel to back them with transparent huge pages); the slivers become kilobytes, too big for
  those caches, and merge back. It is the alignment, not the huge pages: the same holds with
  transparent huge pages switched off for the process (``prctl``). Without checkpointing it
  saves nothing (the live activations dominate) and costs some speed, so runs that do not
  checkpoint are left alone. (Turning the tcache and fast bins off outright,
  ``GLIBC_TUNABLES=glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0``, also helps; glibc reads
  that only at process start, so it is left to the user.) torch reads the variable once, at its
  first CPU allocation: it must be in the environment before ``import torch``.
  :func:`buffers_page_aligned` tells whether it took.
- :func:`release_freed_memory` (opt-in, ``train.release_memory``) fixes the mmap threshold at
  128 KiB (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic adjustment off) and trims
  the heap top at the same size, so every large buffer is its own mapping, returned by ``free``.
  The price is a page fault per touched page of every new buffer: slower steps. For the longest
  contexts under a RAM budget.

Off glibc (macOS, musl) both do nothing and return False. A user who preloads jemalloc or
tcmalloc has chosen their allocator: glibc's ``mallopt`` then still answers but governs nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cllora.config import Config

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024
ALIGN_ENV = "THP_MEM_ALLOC_ENABLE"  # read by torch's CPU allocator (c10 alloc_cpu)


@functools.cache
def glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS, Windows)
    return libc


def align_large_buffers(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask torch to page-align its CPU buffers of 2 MiB and more.

    Sets ``THP_MEM_ALLOC_ENABLE=1`` unless the variable is already set (a user's explicit ``0``
    wins), in ``os.environ`` by default (this process, which must not have imported torch yet,
    and its children) or in ``environ``, the environment of a child process to start. Returns
    whether the setting will be in force there: False off Linux, when the variable says
    otherwise, or, for this process, when torch is already imported (torch read the
    environment at its first allocation; then nothing is changed)."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return False
    if ALIGN_ENV not in env:
        if environ is None and "torch" in sys.modules:
            return False
        env[ALIGN_ENV] = "1"
    return env[ALIGN_ENV] == "1"


def wants_aligned_buffers(cfg: Config) -> bool:
    """The runs that get page-aligned buffers: those that checkpoint or release memory (where
    it lowers the peak RSS; elsewhere it saves nothing and costs speed: the module docstring)."""
    return bool(cfg.train.checkpointing or cfg.train.release_memory)


def buffers_page_aligned() -> bool:
    """Whether torch's big CPU buffers come page-aligned in this process (torch imported here).

    Two live 2 MiB buffers are both page-aligned by chance once in ~4000 without the setting
    (64-byte alignment)."""
    import torch

    a, b = torch.empty(2**19 + 16, dtype=torch.float32), torch.empty(2**19 + 32)
    return a.data_ptr() % 4096 == 0 and b.data_ptr() % 4096 == 0


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Serve blocks >= ``threshold`` bytes by ``mmap`` and trim the heap top past it (glibc).

    Returns whether the setting took effect (False on a non-glibc platform). Affects blocks
    allocated from now on; call it before building the model and the first step."""
    libc = glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, int(threshold)) == 1 and ok
    if ok:
        libc.malloc_trim(0)
    return ok


def rss_gib(pid: int | None = None) -> float:
    """Resident set size in GiB of this process or of ``pid`` (Linux; 0.0 elsewhere or when the
    process is gone)."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0
