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


def test_the_replay_records_the_allocators_segments_and_compares_them(tmp_path, capsys):
    """The layouts a replayed search records (after the build, at each failure, after each
    probe) are consistent with its probes; ``--compare-layouts`` sets a record beside the
    replay stage by stage (here the replay's own record: every column equal)."""
    import json

    from cllora.plan.allocator import summarize
    from cllora.plan.cli import main
    from cllora.plan.search import compare_layouts, replay_search

    spec = PlanSpec(model="tiny-llama", provider="cllora-4bit")
    layouts: dict = {}
    best, probes = replay_search(spec, 0.024, hi=2048, step=512, layouts=layouts)
    assert [p["context"] for p in layouts["probes"]] == [p.context for p in probes]
    assert {p.ok for p in probes} == {True, False}  # a probe that fits and one that fails
    for probe, record in zip(probes, layouts["probes"], strict=True):
        assert summarize(record["after"])["allocated"] == probe.allocated_after
        if not probe.ok:
            at_failure = summarize(record["at_failure"])
            assert probe.peak_reserved >= at_failure["reserved"] > at_failure["allocated"]
    assert summarize(layouts["build"])["allocated"] > 0
    lines = compare_layouts(layouts, layouts)
    assert len(lines) == 2 + 1 + len(probes) + sum(not p.ok for p in probes)
    for line in lines[2:]:
        cells = line.strip("|").split("|")[1:]
        assert all(len({x.strip() for x in c.split(" / ")}) == 1 for c in cells), line
    measured = tmp_path / "alloc-layout-cllora-4bit.json"
    measured.write_text(json.dumps(layouts))
    argv = ["--model", "tiny-llama", "--providers", "cllora-4bit", "--contexts", "64",
            "--find-max-context", "--replay-allocator", "--budget-gb", "0.024",
            "--max-context-hi", "2048", "--max-context-step", "512",
            "--compare-layouts", str(measured)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"(allocator replay: {best})" in printed and "| after the build |" in printed
    (tmp_path / "bad.json").write_text("[]")
    assert main([*argv[:-1], str(tmp_path / "bad.json")]) == 2
    assert "is not an alloc-layout" in capsys.readouterr().err
