"""Faults and bad input that must end in a clear message or a correct result, never a silently
wrong one: non-finite models, damaged or edited checkpoints, data or config changed between a
kill and ``--resume``, starts that fail or are killed, Ctrl-C / SIGTERM, and the CLI's one-line
errors. Each test injects the fault for real (a kill, an edit, a poisoned tensor)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from cllora.cli import main
from cllora.config import ConfigError, load_config
from cllora.fed.checkpoint import load_checkpoint, save_checkpoint
from cllora.fed.guards import NonFiniteError, check_finite, non_finite
from cllora.fed.resume import open_resume
from cllora.fed.server import run_experiment
from tests.conftest import metrics_without_times, records_of, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]


def _data_dir(tmp_path: Path, n: int = 10) -> Path:
    """Two data owners (files) of ``n`` question/answer records each."""
    out = tmp_path / "data"
    out.mkdir()
    for name in ("CDC", "GARD"):
        rows = [
            {"question": f"What does the {name} say about topic {i}?",
             "answer": f"The {name} notes that topic {i} is treated with rest and the right care.",
             "source": name}
            for i in range(n)
        ]  # fmt: skip
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# ------------------------------------------------------------------ non-finite values


def test_non_finite_names_the_tensors():
    state = {"a": torch.ones(3), "b": {"m": torch.tensor([1.0, math.inf, math.nan])}}
    assert non_finite(state) == ["b.m (2 of 3)"]
    check_finite({"a": torch.ones(2), "n": torch.arange(3)}, "x")  # ints are never non-finite
    with pytest.raises(NonFiniteError, match=r"the update holds NaN/inf values: b\.m \(2 of 3\)"):
        check_finite(state, "the update")


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])
def test_numeric_config_values_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"train\.lr.*allowed: a finite number"):
        load_config(None, [f"train.lr={value}"])


def test_a_non_finite_client_update_fails_that_client_only(tmp_path):
    """Fault injection: a hook makes the first optimizer step of the run write a NaN into a
    LoRA tensor after the step (as an overflowing step would); the loss before each step cannot
    see it with one local step. That client fails the round (logged like a NaN loss); the
    others are aggregated and the run ends with a finite adapter."""
    poisoned = []

    def poison(opt, args, kwargs):
        if not poisoned:
            opt.param_groups[0]["params"][0].data[0, 0] = math.nan
            poisoned.append(True)

    handle = register_optimizer_step_post_hook(poison)
    try:
        argv = tiny_run_overrides(tmp_path, run_name="nan", train__local_steps=1, fed__rounds=1)
        result = run_experiment(load_config(None, argv))
    finally:
        handle.remove()
    failed = records_of(result.run_dir, "client_failed")
    assert len(failed) == 1 and "NonFiniteError" in failed[0]["error"]
    assert "lora_A" in failed[0]["error"] and "(1 of" in failed[0]["error"]
    assert records_of(result.run_dir, "round")[0]["succeeded"] == 4
    assert failed[0]["client"] not in {
        r["client"] for r in records_of(result.run_dir, "client_train")
    }
    assert not non_finite(result.global_state)
    assert not non_finite(load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors")))


def test_a_local_model_that_evaluates_non_finite_fails_its_client(tmp_path):
    """lr=1e30: one local step leaves finite but huge LoRA factors whose products overflow, so
    the local model's loss is not finite: the client fails, no NaN reaches metrics.jsonl, and
    with every client failed the run stops with the round-0 checkpoint."""
    argv = tiny_run_overrides(tmp_path, run_name="big", train__local_steps=1, train__lr=1e30)
    assert main(["run", *argv]) == 1
    run_dir = tmp_path / "big"
    failed = records_of(run_dir, "client_failed")
    assert len(failed) == 5 and all("non-finite loss" in r["error"] for r in failed)
    assert "NaN" not in (run_dir / "metrics.jsonl").read_text()
    assert "Infinity" not in (run_dir / "metrics.jsonl").read_text()
    assert load_checkpoint(run_dir / "checkpoint").round == 0
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.csv").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        # the server step overflows: the aggregate itself is infinite
        (dict(fed__strategy="fedadam", fed__server_lr=1e39), "aggregated global adapter"),
        # a finite aggregate whose model overflows: the global evaluation is not finite
        (dict(fed__strategy="fedavgm", fed__server_lr=1e30, eval__local="false"), "test loss"),
    ],
)
def test_a_non_finite_global_model_stops_on_the_last_good_checkpoint(tmp_path, capsys, extra,
                                                                     message):  # fmt: skip
    argv = tiny_run_overrides(tmp_path, run_name="g", **extra)
    assert main(["run", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cllora: stopped: round 1:") and message in err[-1]
    ckpt = load_checkpoint(tmp_path / "g" / "checkpoint")
    assert ckpt.round == 0 and not non_finite(ckpt.global_state)
    assert all(math.isfinite(row["global_loss"]) for row in ckpt.rows)
    assert not (tmp_path / "g" / "adapter").exists()


# ------------------------------------------------------------------ checkpoints and resume


def _tiny_run(tmp_path: Path, name: str, **extra) -> Path:
    cfg = load_config(None, tiny_run_overrides(tmp_path, run_name=name, **extra))
    return run_experiment(cfg).run_dir


def test_an_edited_state_json_is_detected_and_the_previous_checkpoint_used(tmp_path):
    state = {"m.lora_A": torch.ones(2, 3)}
    save_checkpoint(tmp_path, 1, state, {}, [{"round": 1, "global_loss": 2.5}], extra={"rng": []})
    save_checkpoint(tmp_path, 2, state, {}, [{"round": 2, "global_loss": 2.0}], extra={"rng": []})
    newest = tmp_path / "round-0002" / "state.json"
    newest.write_text(newest.read_text().replace("2.0", "1.0"))  # a "better" result
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1 and ckpt.rows[0]["global_loss"] == 2.5
    (tmp_path / "round-0001" / "state.json").write_text("{")  # damaged too: nothing to use
    with pytest.raises(Exception, match=r"no intact checkpoint.*state\.json: checksum mismatch"):
        load_checkpoint(tmp_path)


def test_resume_after_an_edited_state_json_gives_the_uninterrupted_result(tmp_path):
    ref = _tiny_run(tmp_path, "ref")
    run_dir = _tiny_run(tmp_path, "edited")
    state = run_dir / "checkpoint" / "round-0002" / "state.json"
    meta = json.loads(state.read_text())
    meta["rows"][-1]["global_loss"] = 0.001  # what would flow into summary.csv
    state.write_text(json.dumps(meta))
    (run_dir / "summary.csv").unlink()
    assert main(["run", "--resume", str(run_dir)]) == 0  # falls back to round 1, redoes 2
    assert (run_dir / "summary.csv").read_text() == (ref / "summary.csv").read_text()
    assert metrics_without_times(run_dir) == metrics_without_times(ref)


def test_resume_refuses_data_changed_since_the_run_started(tmp_path, capsys):
    data = _data_dir(tmp_path)
    run_dir = _tiny_run(tmp_path, "d", data__path=str(data), fed__rounds=1)
    (data / "GARD.jsonl").write_text((data / "GARD.jsonl").read_text().replace("the", "a"))
    (data / "NEW.jsonl").write_text((data / "CDC.jsonl").read_text())
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "data changed since the run started" in err
    assert "data file GARD.jsonl changed" in err and "data file NEW.jsonl is new" in err
    assert "CDC.jsonl" not in err.split("(")[1].split(" in ")[0]


def test_resume_refuses_samples_that_differ_from_the_checkpoint(tmp_path):
    """Files unchanged, samples different (as another tokenizer or chat template would give):
    the sample-level fingerprint catches it once the clients are rebuilt."""
    run_dir = _tiny_run(tmp_path, "s", fed__rounds=1)
    ckpt = load_checkpoint(run_dir / "checkpoint")
    extra = json.loads(json.dumps(ckpt.extra))
    extra["data"]["samples"]["language"] = "0" * 64
    save_checkpoint(run_dir / "checkpoint", ckpt.round, ckpt.global_state, ckpt.server_state,
                    ckpt.rows, extra=extra)  # fmt: skip
    with pytest.raises(ConfigError, match="the samples of client language changed"):
        run_experiment(None, run_dir)


def test_resume_refuses_a_config_yaml_edited_after_the_start(tmp_path):
    run_dir = _tiny_run(tmp_path, "c", fed__rounds=1)
    saved = run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("lr: 0.005", "lr: 0.5"))
    with pytest.raises(ConfigError, match=r"config.yaml was edited .*differing keys: train\.lr"):
        open_resume(run_dir)


# ------------------------------------------------------------------ failed and killed starts


def test_a_failed_start_leaves_nothing_that_blocks_a_retry(tmp_path, capsys):
    argv = tiny_run_overrides(tmp_path, run_name="retry", fed__rounds=1)
    assert main(["run", *argv, "data.path=/no/such/data.jsonl"]) == 2
    assert "data path not found" in capsys.readouterr().err
    assert not (tmp_path / "retry").exists()
    assert main(["run", *argv]) == 0  # the same run_name, fixed
    assert (tmp_path / "retry" / "summary.csv").is_file()


def _default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal, even when the test runs in a background job
    (whose shell ignores SIGINT, an ignore the child would inherit and Python would keep)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cllora", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # fmt: skip


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended first: {proc.communicate()[1][-2000:]}"


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_or_rerun(tmp_path):
    """SIGKILL while the model and data load (config.yaml written, no checkpoint yet): the
    directory blocks neither ``--resume`` (the run starts over) nor a rerun of the same name."""
    results = []
    for name, retry in (("k", "--resume"), ("k2", "rerun")):
        argv = tiny_run_overrides(tmp_path, run_name=name, fed__rounds=1)
        run_dir = tmp_path / name
        proc = _cli(["run", *argv])
        try:
            _wait_for(proc, lambda d=run_dir: (d / "config.yaml").is_file())
        finally:
            proc.kill()
            proc.communicate()
        assert not (run_dir / "checkpoint").exists()  # killed during the start
        again = ["--resume", str(run_dir)] if retry == "--resume" else argv
        assert main(["run", *again]) == 0  # --resume starts it over; a rerun reuses the name
        results.append(metrics_without_times(run_dir))
    assert results[0] == results[1]  # both started over: the same run


def test_a_named_run_with_results_is_never_overwritten(tmp_path, capsys):
    _tiny_run(tmp_path, "done", fed__rounds=1)
    assert main(["run", *tiny_run_overrides(tmp_path, run_name="done")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("not cllora's")
    assert main(["run", *tiny_run_overrides(tmp_path, run_name="mine")]) == 2
    assert "not a cllora run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "not cllora's"


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])  # fmt: skip
def test_ctrl_c_prints_the_resume_command_and_the_resume_completes(tmp_path, sig, code, word):
    argv = tiny_run_overrides(tmp_path, run_name="i", fed__rounds=2)
    run_dir = tmp_path / "i"
    proc = _cli(["run", *argv])
    metrics = run_dir / "metrics.jsonl"
    _wait_for(proc, lambda: metrics.is_file() and '"round": 1' in metrics.read_text())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == (
        f"cllora: {word}; resume with: cllora run --resume {run_dir}"
    )
    assert "Traceback" not in err
    if sig == signal.SIGINT:  # the printed command completes the run (SIGTERM: the same path)
        assert main(["run", "--resume", str(run_dir)]) == 0
        assert (run_dir / "summary.csv").is_file()


# ------------------------------------------------------------------ one-line errors


def _one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("cllora:")]
    assert len(err) == 1, err
    return err[0]


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: tiny-llama\n dtype: fp32\n")
    err = _one_line_error(capsys, ["run", str(bad)])
    assert f"{bad}:3:2: YAML syntax error" in err
    err = _one_line_error(capsys, ["run", "train.lr=[1"])
    assert "override 'train.lr=[1': the value is not valid YAML" in err
    bad.write_bytes(b"model:\n  name: \xff\xfe\n")
    assert "not UTF-8 text" in _one_line_error(capsys, ["config", str(bad)])


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "a\\b"])
def test_run_name_stays_inside_out_dir(tmp_path, capsys, name):
    err = _one_line_error(capsys, ["run", *tiny_run_overrides(tmp_path), f"run_name={name}"])
    assert "config key 'run_name'" in err and "inside out_dir" in err
    assert list(tmp_path.iterdir()) == []


def test_an_unusable_out_dir_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "runs"):
        argv = [*tiny_run_overrides(tmp_path, run_name="o"), f"out_dir={out}"]
        assert "out_dir" in _one_line_error(capsys, ["run", *argv])


def test_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["run", *tiny_run_overrides(tmp_path), "data.path=/no/such.jsonl"]
    _one_line_error(capsys, argv)
    with pytest.raises(Exception, match="data path not found"):
        main(["--debug", *argv])
    with pytest.raises(Exception, match="data path not found"):
        main([*argv[:1], "--debug", *argv[1:]])
