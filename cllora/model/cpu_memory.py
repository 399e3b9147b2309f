"""Peak RSS on CPU: make glibc give freed activation buffers back to the OS.

Usage::

    from cllora.model.cpu_memory import release_freed_memory, rss_gib

    if release_freed_memory():     # train.release_memory=true calls this in build_model
        ...                        # True on glibc; False (nothing changed) elsewhere

Why: torch's CPU tensors come from ``malloc``. glibc serves big blocks with ``mmap`` only until
the first such block is freed; then its *dynamic* threshold climbs (up to 32 MiB) and later
blocks of activation size come from the heap, where a freed block stays resident until
everything above it is freed too. A training step allocates and frees tens of GB of
(tokens x hidden) buffers in changing orders, so the heap fragments: measured on SmolLM2-135M,
2048 tokens, checkpointing, 2 cores: peak RSS 3.1 GiB where the live peak is ~1.3 GiB.
:func:`release_freed_memory` fixes the threshold at 128 KiB (``mallopt(M_MMAP_THRESHOLD)``,
which also turns the dynamic adjustment off) and trims the heap top at the same size, so every
large buffer is its own mapping, returned by ``free``. The price is a page fault per touched
page of every new buffer: the same step took 30-60% longer. It is therefore opt-in
(``train.release_memory``), for the longest contexts under a RAM budget. Off glibc (macOS,
musl) the call does nothing and returns False. A user who preloads jemalloc or tcmalloc has
chosen their allocator: glibc's ``mallopt`` then still answers but governs nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS, Windows)
    return libc


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Serve blocks >= ``threshold`` bytes by ``mmap`` and trim the heap top past it (glibc).

    Returns whether the setting took effect (False on a non-glibc platform). Affects blocks
    allocated from now on; call it before building the model and the first step."""
    libc = _glibc()
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
