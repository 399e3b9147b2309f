"""The benchmark's max-context search replayed in one process through one capped allocator."""

from __future__ import annotations

from cllora.plan.search import bisect_max, replay_probes
from cllora.plan.step import PlanSpec


def test_bisect_max_probes_as_the_benchmark():
    seen = []

    def fits(n: int) -> bool:
        seen.append(n)
        return n <= 102

    assert bisect_max(fits, 256) == 102
    assert seen[:3] == [128, 64, 96]  # bench_e2e's (lo + hi + 1) // 2 from lo=0, hi=256
    assert bisect_max(lambda n: False, 256) == 0


def test_one_process_carries_the_model_and_the_adamw_state_across_probes():
    """A 24 MiB cap: 4096 tokens fail, 128 fit. A failed probe frees what it made; the AdamW
    state appears with the first step that succeeds and stays."""
    spec = PlanSpec(model="tiny-llama", provider="cllora-4bit")
    failed, fitted, failed_again = replay_probes(spec, 0.024, [4096, 128, 4096])
    assert (failed.ok, fitted.ok, failed_again.ok) == (False, True, False)
    assert "requested" in failed.error and failed.peak_reserved <= 0.024 * 2**30
    state = fitted.allocated_after - failed.allocated_after  # AdamW's exp_avg, exp_avg_sq
    assert 0 < state < 0.01 * 2**30
    assert failed_again.allocated_after == fitted.allocated_after
