"""`cllora bench` and `cllora profile` end to end on a tiny Llama (CPU, fresh processes), and the
pieces that turn their CSVs into numbers: the cost-model fit, operator categories, the
docs' benchmark table (docs/gpu.md)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cllora.bench.figure import figure
from cllora.bench.profile import CATEGORIES, categorize, fit_cost_model
from cllora.bench.report import DOC, END, START, markdown_tables, write_tables
from cllora.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny-llama", "--dtype", "fp32", "--threads", "1", "--steps", "1"]


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bench_measures_every_provider_side_by_side(tmp_path, capsys):
    argv = ["bench", *TINY, "--providers", "cllora,cllora-lowmem,cllora-4bit,hf-peft",
            "--workloads", "fixed", "--contexts", "48", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (path,) = tmp_path.glob("e2e-cpu-*.csv")
    rows = _rows(path)
    status = {r["provider"]: r["value"] for r in rows if r["metric"] == "status"}
    assert status == dict.fromkeys(("cllora", "cllora-lowmem", "cllora-4bit", "hf-peft"), "ok")
    for r in rows:
        if r["metric"] in ("tokens_per_s", "peak_mem"):
            assert float(r["value"]) > 0
        assert r["device"].startswith("cpu") and r["commit"]
    assert path.with_suffix(".png").stat().st_size > 10_000
    table = markdown_tables([path])
    assert "| cllora-4bit |" in table and "vs hf-peft" in table


def test_an_unknown_provider_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--providers", "nope", "--out-dir", str(tmp_path)]) == 2
    assert "unknown provider 'nope'" in capsys.readouterr().err


def test_an_out_of_memory_cell_is_recorded_not_a_crash(tmp_path):
    argv = ["bench", *TINY, "--providers", "cllora", "--workloads", "fixed", "--contexts", "32",
            "--budget-gb", "0.05", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (path,) = tmp_path.glob("e2e-cpu-*.csv")
    assert [r["value"] for r in _rows(path) if r["metric"] == "status"] == ["oom"]
    texts = _texts(figure(_rows(path)))
    assert "cllora: OOM" in texts and any(t.startswith("cllora fixed 32: oom") for t in texts)


def _texts(fig) -> list[str]:
    """Every text of a figure: its panels' annotations and the lines under them."""
    import matplotlib.pyplot as plt

    texts = [*(t for ax in fig.axes for t in ax.texts), *fig.texts]
    out = [line for t in texts for line in t.get_text().splitlines()]
    plt.close(fig)
    return out


@pytest.mark.parametrize("command", ["bench", "profile"])
def test_a_failing_cell_is_recorded_and_the_exit_status_says_so(tmp_path, capsys, command):
    """A cell whose process fails (here: a model that does not exist) keeps its error in the CSV,
    prints the exception's own line and makes the command exit 1; the other cells still run."""
    argv = [command, *TINY, "--model", "no-such-model", "--contexts", "32", "--out-dir",
            str(tmp_path)]  # fmt: skip
    argv += (["--providers", "hf-peft", "--workloads", "fixed"] if command == "bench"
             else ["--provider", "hf-peft"])  # fmt: skip
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "no-such-model" in out and "failed with an error" in err
    (path,) = tmp_path.glob("*.csv")
    rows = _rows(path)
    assert ("status", "error") in {(r["metric"], r["value"]) for r in rows}
    assert any(r["metric"] == "error" and "no-such-model" in r["value"] for r in rows)
    if command == "bench":  # the start of the cell is printed before its end; PNG, table
        lines = out.splitlines()
        started = next(i for i, ln in enumerate(lines) if "started (batch 1)" in ln)
        assert lines[started].split()[:3] == ["fixed", "32", "hf-peft"]
        assert "no-such-model" in "".join(lines[started + 1 :])
        (error,) = [r["value"] for r in rows if r["metric"] == "error"]
        texts = _texts(figure(rows))
        assert "hf-peft: error" in texts and f"hf-peft fixed 32: error: {error}"[:160] in texts
        assert f"| hf-peft | error: {error.replace('|', '/')} |" in markdown_tables([path])


def test_the_context_axis_is_labelled_in_tokens():
    rows = [{"provider": "cllora", "workload": "fixed", "context": str(t), "batch": "1",
             "metric": "tokens_per_s", "value": "100"} for t in (512, 1024, 2048)]  # fmt: skip
    fig = figure(rows)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    _texts(fig)
    assert labels == ["512", "1024", "2048"]


@pytest.mark.parametrize("provider", ["liger", "cllora-4bit-offload"])
def test_cuda_only_providers_refuse_the_cpu(tmp_path, capsys, provider):
    assert main(["bench", "--providers", provider, "--out-dir", str(tmp_path)]) == 2
    assert "--device cuda" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="needs CUDA and liger-kernel",
)
def test_liger_providers_run_beside_the_baselines_on_cuda(tmp_path):
    argv = ["bench", "--model", "tiny-llama", "--dtype", "bf16", "--device", "cuda", "--steps",
            "1", "--providers", "liger,liger-4bit,hf-peft,hf-peft-4bit", "--workloads", "fixed",
            "--contexts", "64", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (path,) = tmp_path.glob("e2e-cuda-*.csv")
    status = {r["provider"]: r["value"] for r in _rows(path) if r["metric"] == "status"}
    assert status == dict.fromkeys(("liger", "liger-4bit", "hf-peft", "hf-peft-4bit"), "ok")


def test_find_max_context_binary_search_records_every_probe(tmp_path):
    """CPU search in steps of 128 tokens up to 512, one (warm-up) step per probe: every probe
    fits a 20 GiB budget, so the search walks up to the top (256, 384, 512) and says 512."""
    argv = ["bench", *TINY, "--providers", "cllora", "--workloads", "fixed", "--contexts", "",
            "--find-max-context", "--max-context-hi", "512", "--max-context-step", "128",
            "--probe-steps", "0", "--budget-gb", "20", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (path,) = tmp_path.glob("e2e-cpu-*.csv")
    rows = _rows(path)
    probes = [r for r in rows if r["workload"] == "max-context-probe" and r["metric"] == "status"]
    assert [(int(r["context"]), r["value"]) for r in probes] == [
        (256, "ok"),
        (384, "ok"),
        (512, "ok"),
    ]
    (best,) = [r for r in rows if r["metric"] == "max_context"]
    assert int(best["value"]) == 512 and best["unit"] == "tokens under 20 GiB"


def test_profile_splits_the_step_and_fits_the_cost_model(tmp_path):
    argv = ["profile", *TINY, "--contexts", "24,40,72", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    (path,) = tmp_path.glob("profile-cpu-*.csv")
    rows = _rows(path)
    for t in (24, 40, 72):  # not 16: a token count equal to the LoRA rank reads as LoRA
        cell = {r["metric"]: float(r["value"]) for r in rows if r["context"] == str(t)}
        parts = [cell[f"time_{c}"] for c in CATEGORIES]
        assert sum(parts) == pytest.approx(cell["step_s"], rel=1e-3)
        assert cell["time_base_matmul"] > 0 and cell["time_lora_matmul"] > 0
        assert cell["time_loss"] > 0 and cell["time_optimizer"] > 0
        trace = json.loads((path.with_suffix("") / f"trace-{t}.json").read_text())
        assert trace["traceEvents"]
    fits = {r["metric"]: float(r["value"]) for r in rows if r["metric"].startswith("fit_")}
    assert set(fits) == {"fit_a", "fit_b", "fit_c"} and min(fits.values()) >= 0
    assert path.with_suffix(".png").is_file()


def test_cost_model_recovers_known_coefficients_and_stays_non_negative():
    ts = [512, 1024, 2048, 4096]
    a, b, c = fit_cost_model(ts, [0.2 + 1e-4 * t + 3e-8 * t * t for t in ts])
    assert (a, b, c) == pytest.approx((0.2, 1e-4, 3e-8), rel=1e-6)
    a, b, c = fit_cost_model([64, 128, 256], [0.057, 0.070, 0.180])  # noisy: b would be < 0
    assert min(a, b, c) >= 0 and c > 0


def test_operator_categories():
    assert categorize("aten::mm", [[4096, 16], [16, 576]], 16) == "lora_matmul"
    assert categorize("aten::mm", [[4096, 576], [576, 1536]], 16) == "base_matmul"
    assert categorize("aten::_scaled_dot_product_flash_attention", [], 16) == "attention"
    assert categorize("ChunkedLinearCrossEntropyBackward", [], 16) == "loss"
    assert categorize("Optimizer.step#AdamW.step", [], 16) == "optimizer"
    assert categorize("aten::rsqrt", [[1, 4]], 16) == "norm_act"
    assert categorize("aten::index_select", [[4]], 16) == "other"
    assert categorize("aten::mm", [[1000, 576], [576, 49152]], 16, vocab=49152) == "loss"
    # the LoRA update added in place into the base output (cllora.model.lora.DenseLoRAFunction)
    assert categorize("aten::addmm_", [[4096, 1536], [4096, 16], [16, 1536]], 16) == "lora_matmul"


def test_published_benchmark_table_is_the_one_the_committed_csvs_give(tmp_path):
    """docs/gpu.md's table between the markers is generated from benchmarks/results/e2e-*.csv
    (``python benchmarks/report_e2e.py --doc docs/gpu.md benchmarks/results/e2e-*.csv``)."""
    assert Path("docs/gpu.md") == DOC
    doc = (ROOT / DOC).read_text()
    section = doc.split(START, 1)[1].split(END, 1)[0].strip()
    csvs = sorted((ROOT / "benchmarks" / "results").glob("e2e-*.csv"))
    assert section == markdown_tables(csvs).strip()
    assert START not in (ROOT / "README.md").read_text()  # one published copy
    copy = tmp_path / "gpu.md"
    copy.write_text(f"intro\n{START}\nold\n{END}\nrest\n")
    write_tables(copy, "NEW")
    assert copy.read_text() == f"intro\n{START}\nNEW\n{END}\nrest\n"
