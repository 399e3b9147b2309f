"""A run's outputs are never lost or silently wrong: a directory that holds results is never
reused or recomputed over, only directories cllora started are resumed, and every output file of
a run deleted before ``--resume`` is either restored (the run ends with the same results) or the
resume is refused naming it. Each fault is injected for real on a finished tiny run's copy."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from cllora.cli import main
from cllora.config import load_config, save_config
from cllora.fed.resume import MARKER
from cllora.fed.server import run_experiment
from tests.conftest import metrics_without_times, tiny_run_overrides


def _digests(run_dir: Path) -> dict[str, str]:
    """Every file under ``run_dir`` (relative path -> SHA-256)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-round tiny run (with a quality score, so samples.csv exists)."""
    root = tmp_path_factory.mktemp("finished")
    cfg = load_config(None, tiny_run_overrides(root, run_name="done", quality__score_samples=2))
    return run_experiment(cfg).run_dir


def _copy(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "done"
    shutil.copytree(finished, run_dir)
    return run_dir


def test_every_run_directory_is_marked(finished):
    assert (finished / MARKER).is_file()


def test_a_finished_run_without_its_checkpoint_is_never_reused_or_recomputed(
    finished, tmp_path, capsys
):
    run_dir = _copy(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoint")
    before = _digests(run_dir)
    argv = tiny_run_overrides(tmp_path, run_name="done", quality__score_samples=2)
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert "holds the results of a run" in err and "summary.csv" in err and "adapter" in err
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "never overwrites results" in capsys.readouterr().err
    assert _digests(run_dir) == before


def test_only_metrics_with_rounds_are_results_too(finished, tmp_path, capsys):
    """A run killed after round 1's records but before its checkpoint, whose round-0 checkpoint
    was then deleted: its metrics.jsonl holds round records, so it is not started over."""
    run_dir = _copy(finished, tmp_path)
    for name in ("checkpoint", "adapter"):
        shutil.rmtree(run_dir / name)
    for name in ("summary.csv", "sample_losses.csv", "timing.json"):
        (run_dir / name).unlink()
    before = _digests(run_dir)
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "metrics.jsonl (round records)" in capsys.readouterr().err
    assert _digests(run_dir) == before


@pytest.mark.parametrize("with_config", [True, False])
def test_resume_touches_nothing_cllora_did_not_start(tmp_path, capsys, with_config):
    """A user's folder with a valid config.yaml beside their own adapter/ and summary.csv."""
    folder = tmp_path / "mine"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"my weights")
    (folder / "summary.csv").write_text("round,loss\n1,0.5\n")
    (folder / "notes.txt").write_text("mine")
    if with_config:
        save_config(load_config(None, tiny_run_overrides(tmp_path)), folder / "config.yaml")
    before = _digests(folder)
    assert main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "not a cllora run" in err and "Traceback" not in err
    assert _digests(folder) == before


def test_an_unstarted_directory_without_the_marker_is_not_reused(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    save_config(load_config(None, tiny_run_overrides(tmp_path)), folder / "config.yaml")
    (folder / "metrics.jsonl").write_text("my own log\n")
    before = _digests(folder)
    assert main(["run", *tiny_run_overrides(tmp_path, run_name="mine")]) == 2
    assert "not a cllora run" in capsys.readouterr().err
    assert _digests(folder) == before


# What deleting each output before --resume must give: "restored" (the run ends with the same
# results as before) or the word the refusal names. The final outputs are rewritten by every
# run's end; timing.json and run.log hold wall-clock times, so they are only required to exist.
OUTPUTS = {
    "config.yaml": "restored",
    MARKER: "restored",
    "clients.csv": "restored",
    "samples.csv": "restored",
    "summary.csv": "restored",
    "sample_losses.csv": "restored",
    "timing.json": "restored",
    "run.log": "restored",
    "adapter": "restored",
    "metrics.jsonl": "metrics.jsonl is missing",
    "checkpoint": "never overwrites results",
}
_TIMED = {"timing.json", "run.log"}


def test_outputs_covers_every_output_of_a_run(finished):
    assert {p.name for p in finished.iterdir()} == set(OUTPUTS)


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_resume_after_an_output_was_deleted_restores_it_or_refuses(
    finished, tmp_path, capsys, name
):
    run_dir = _copy(finished, tmp_path)
    path = run_dir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    before = _digests(run_dir)
    code = main(["run", "--resume", str(run_dir)])
    err = capsys.readouterr().err
    expected = OUTPUTS[name]
    if expected != "restored":
        assert code == 2 and expected in err and "Traceback" not in err
        assert _digests(run_dir) == before  # refused before anything was touched
        return
    assert code == 0, err
    assert path.exists()
    want = {k: v for k, v in _digests(finished).items() if not k.startswith(tuple(_TIMED))}
    got = {k: v for k, v in _digests(run_dir).items() if not k.startswith(tuple(_TIMED))}
    if name == MARKER:  # a new marker carries the time it was written
        want.pop(MARKER), got.pop(MARKER)
    assert got == want
    assert metrics_without_times(run_dir) == metrics_without_times(finished)


def test_resume_refuses_a_metrics_file_that_lost_records(finished, tmp_path, capsys):
    run_dir = _copy(finished, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-3]))  # cut, e.g. by a restore from an older backup
    before = _digests(run_dir)
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"metrics.jsonl holds {len(lines) - 3} records" in err
    assert _digests(run_dir) == before


def test_a_killed_run_without_config_yaml_resumes_from_its_checkpoint(
    finished, tmp_path, capsys, caplog
):
    """The loop of issue 29 (--resume: "not a run directory"; rerun: "already holds a run")
    ends: the checkpoint's config is restored, and the rerun's message still says --resume."""
    run_dir = _copy(finished, tmp_path)
    (run_dir / "config.yaml").unlink()
    argv = tiny_run_overrides(tmp_path, run_name="done", quality__score_samples=2)
    assert main(["run", *argv]) == 2
    assert f"cllora run --resume {run_dir}" in capsys.readouterr().err
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert "config.yaml was missing" in caplog.text
    assert (run_dir / "config.yaml").read_bytes() == (finished / "config.yaml").read_bytes()


def test_run_log_reads_as_words_with_a_line_per_round(finished):
    """No raw Python dicts or lists; every round says who trained and what the global model did."""
    text = (finished / "run.log").read_text()
    messages = [line.split(" cllora: ", 1)[1] for line in text.splitlines() if " cllora: " in line]
    assert not [m for m in messages if "{" in m or "[" in m or "'" in m]
    assert any(m.startswith("engine: device cpu") for m in messages)
    assert any(m.startswith("data ") and "records " in m for m in messages)
    for r in (1, 2):
        assert any(m.startswith(f"round {r} of 2: ") and "trainees sent an update" in m
                   for m in messages)  # fmt: skip


def test_the_quality_score_shows_progress(tmp_path, capsys):
    cfg = load_config(None, tiny_run_overrides(tmp_path, fed__rounds=1, quality__score_samples=2,
                                               progress=True))  # fmt: skip
    run_experiment(cfg)
    assert "quality score" in capsys.readouterr().err


def test_every_output_has_the_mode_the_umask_gives(finished):
    """safetensors writes 0600: the adapter and checkpoints are readable like every other file."""
    from cllora.files import umask

    for path in [finished, *finished.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask()
        assert path.stat().st_mode & 0o777 == want, path
