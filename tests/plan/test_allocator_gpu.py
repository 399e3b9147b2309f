"""The caching-allocator model against CUDA's own allocator (runs when a GPU is lent).

A seeded sequence of allocations and frees, sized like a checkpointed training step's (small
tensors, 1-10 MiB blocks, buffers of hundreds of MiB freed and reallocated at other sizes), runs
on CUDA in a fresh process under a cap (``set_per_process_memory_fraction``) and through
:class:`cllora.plan.allocator.CachingAllocator` with the same cap: the segments and their blocks
must be the same after every phase, and an out-of-memory error must strike the same request.
This is what the max-context replay (``cllora.plan.search``) rests on; where it fails, the
model of ``c10/cuda/CUDACachingAllocator.cpp`` is wrong, whatever the traced step does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SCRIPT = r"""
import json, random, sys
import torch
from cllora.plan.allocator import CachingAllocator, OutOfMemory, compact_snapshot

MiB = 2**20
cap = 3 * 2**30
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(cap / total)
model = CachingAllocator(int(cap / total * total))  # the cap as c10 computes it
rng = random.Random(0)
real, mine, out = {}, {}, {"phases": [], "oom": []}

def layout_key(layout):
    return sorted(json.dumps(seg) for seg in layout)

def alloc(key, nbytes):
    try:
        real[key] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        got_real = True
    except torch.OutOfMemoryError:
        got_real = False
    try:
        mine[key] = model.malloc(nbytes)
        got_mine = True
    except OutOfMemory:
        got_mine = False
    if got_real != got_mine:
        out["oom"].append([key, nbytes, got_real, got_mine])

def free(key):
    if key in real:
        del real[key]
    if key in mine:
        model.free(mine.pop(key))

sizes = [512, 4096, 300_000, 3 * MiB, 7 * MiB + 123, 24 * MiB, 96 * MiB, 192 * MiB,
         336 * MiB, 672 * MiB]
n = 0
for phase in range(6):
    for _ in range(400):
        if real and (len(real) >= 12 or rng.random() < 0.4):  # a bounded live set
            free(rng.choice(sorted(real)))
        else:
            n += 1
            alloc(n, rng.choice(sizes) + rng.randrange(0, 4096) * 512)
    if phase == 3:
        torch.cuda.empty_cache()
        model.empty_cache()
    snap = compact_snapshot(torch.cuda.memory_snapshot())
    out["phases"].append([layout_key(snap) == layout_key(model.layout()),
                          torch.cuda.memory_reserved(), model.reserved,
                          torch.cuda.memory_allocated(), model.allocated])
print(json.dumps(out))
"""


def test_the_allocator_model_matches_cudas_allocator():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["oom"] == [], result["oom"][:5]  # the same requests failed, and only they
    for i, (same, reserved, planned_reserved, allocated, planned_allocated) in enumerate(
        result["phases"]
    ):
        assert (reserved, allocated) == (planned_reserved, planned_allocated), i
        assert same, f"phase {i}: the segments differ"
