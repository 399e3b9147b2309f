"""A real deployment on 127.0.0.1: a SuperLink (TLS, SuperNode authentication) and SuperNodes
as separate processes, each given only its own data file; `flwr run` submits cllora's app.

One scenario, to keep the suite short (every message starts a ClientApp process): an
unauthorised node is refused; three authorised nodes train two rounds with differential privacy
(Flower's fixedclipping_mod on the nodes, noise on the server) and ``fed.min_clients=2``. In
round 1 one node is killed mid-training: the round is left to the other two. In round 2 a second
node is killed: one success is fewer than ``fed.min_clients``, so the run stops on its last
checkpoint (round 1). Both nodes come back and the run is resumed to its end, with the expected
records.

A second, shorter one (no TLS, one round): nodes whose data cannot load (a malformed line, a
missing file) stop the run, or are left out of it under ``fed.min_clients``, with one line each
naming the node, the file:line and the fix, in `flwr run`'s output and in run.log."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("flwr")

from cllora.flower.app_dir import write_app
from tests.conftest import records_of, tiny_run_overrides
from tests.flower.federation import Federation

WORDS = [
    "the",
    "patient",
    "heart",
    "lung",
    "fever",
    "dose",
    "blood",
    "test",
    "scan",
    "pain",
    "drug",
    "care",
    "risk",
    "acute",
]


def _site_data(path, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(12):
            q = " ".join(rng.choice(WORDS) for _ in range(6))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
            f.write(json.dumps({"question": q + "?", "answer": a}) + "\n")


def test_deployment_tls_auth_killed_nodes_and_resume(tmp_path):
    data = {}
    for k, name in enumerate(("site-a", "site-b", "site-c")):
        data[name] = tmp_path / f"{name}.jsonl"
        _site_data(data[name], k)
    overrides = tiny_run_overrides(
        tmp_path / "runs", train__threads=1, run_name="dep", fed__eval_initial=False,
        fed__min_clients=2, fed__rounds=2, partition__max_test_per_client=2,
        fed__weighting="uniform",
    )  # fmt: skip
    app = write_app(tmp_path / "app", overrides=" ".join(overrides), nodes=3, node_wait=120,
                    round_timeout=300, dp_clipping_norm=0.05, dp_noise_multiplier=0.1)  # fmt: skip
    run_dir = tmp_path / "runs" / "dep"
    with Federation(tmp_path, tls=True, auth=True) as fed:
        fed.start_link()
        intruder = fed.start_node("intruder", data["site-a"], register=False)
        for name in data:
            fed.start_node(name, data[name])
        assert intruder.wait(timeout=120) != 0  # its key is not registered: refused
        assert "Failed to activate SuperNode" in fed.log_text("intruder")
        watcher = _kill_when_training(fed, [("site-c", 1), ("site-b", 2)])
        out = fed.flwr_run(app, "resume=''")
        watcher.join(timeout=5)
        assert (run_dir / "metrics.jsonl").is_file(), out
        # round 1 went on without site-c; round 2 had site-a alone and stopped
        assert [(r["round"], r["succeeded"]) for r in records_of(run_dir, "round")] == [(1, 2)]
        failed = {(r["round"], r["client"]) for r in records_of(run_dir, "client_failed")}
        assert (1, "site-c") in failed and (2, "site-b") in failed, failed
        assert not any(f[0] == 1 and f[1] != "site-c" for f in failed), failed
        first = [e["client"] for e in records_of(run_dir, "global_eval") if e["round"] == 1]
        assert sorted(first) == ["__global__", "site-a", "site-b"]  # site-c was gone
        assert (run_dir / "checkpoint" / "round-0001").is_dir()
        assert not (run_dir / "summary.csv").exists()  # stopped, not finished
        assert "fewer than fed.min_clients=2" in (run_dir / "run.log").read_text()

        for name in ("site-b", "site-c"):
            fed.start_node(name, data[name])
        out = fed.flwr_run(app, f"resume='{run_dir}'")
    rounds = records_of(run_dir, "round")
    assert [(r["round"], r["succeeded"]) for r in rounds] == [(1, 2), (2, 3)], out
    # the resumed round 2 replaced the stopped one's records; round 1's failure stays
    failed = [(r["round"], r["client"]) for r in records_of(run_dir, "client_failed")]
    assert failed == [(1, "site-c")]
    evals = [e for e in records_of(run_dir, "global_eval") if e["round"] == 2]
    assert sorted(e["client"] for e in evals) == ["__global__", "site-a", "site-b", "site-c"]
    assert all(e["loss"] > 0 and e["tokens"] > 0 for e in evals)
    assert all(0 < r["global_loss"] < 20 and r["bytes_up"] > 0 for r in rounds)
    assert all(r["bytes_down"] == r["bytes_up"] for r in rounds[1:])  # FedAvg, all succeeded
    dp = {k: rounds[1][k] for k in ("dp_clipping_norm", "dp_noise_multiplier", "dp_noise_std")}
    assert dp == pytest.approx({"dp_clipping_norm": 0.05, "dp_noise_multiplier": 0.1,
                                "dp_noise_std": 0.1 * 0.05 / 3})  # fmt: skip
    flower = json.loads((run_dir / "flower.json").read_text())
    assert flower["settings"]["dp_clipping_norm"] == 0.05
    assert "fixedclipping_mod: parameters are clipped" in fed.log_text("site-a")
    summary = (run_dir / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("round,global_loss") and len(summary) == 3
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "clients.csv").read_text().count("site-") == 3


def _kill_when_training(fed: Federation, kills: list[tuple[str, int]]):
    """A thread that stops each node of ``kills`` once its ``n``-th training message arrived."""
    import threading

    def kill() -> None:
        for name, n in kills:
            fed.wait_for(name, "Receiving: train", n, timeout=600)
            fed.stop(name)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_nodes_with_bad_data_stop_or_are_left_out_in_one_line(tmp_path):
    good, bad, gone = (tmp_path / f"{n}.jsonl" for n in ("site-a", "site-b", "site-c"))
    _site_data(good, 0)
    _site_data(bad, 1)
    lines = bad.read_text().splitlines()
    lines[2] = '{"question": "broken?", "answer": '  # line 3: not valid JSON
    bad.write_text("\n".join(lines) + "\n")

    def overrides(name: str, min_clients: int) -> str:
        return " ".join(tiny_run_overrides(
            tmp_path / "runs", train__threads=1, run_name=name, fed__eval_initial=False,
            fed__min_clients=min_clients, fed__rounds=1, partition__max_test_per_client=2,
        ))  # fmt: skip

    app = write_app(tmp_path / "app", overrides=overrides("stop", 2), nodes=3, node_wait=120,
                    round_timeout=300)  # fmt: skip
    malformed = f"SuperNode site-b: {bad}:3: malformed record: not valid JSON"
    missing = f"SuperNode site-c: data-path {gone} not found on this SuperNode: restart it"
    with Federation(tmp_path, tls=False, auth=False) as fed:
        fed.start_link()
        for name, path in (("site-a", good), ("site-b", bad), ("site-c", gone)):
            fed.start_node(name, path)
        out = fed.flwr_run(app, "resume=''")
        stop = [x for x in out.splitlines() if x.startswith("cllora: error:")]
        assert len(stop) == 1, out
        assert malformed in stop[0] and "set data.on_malformed=skip" in stop[0], out
        assert missing in stop[0] and "fewer than fed.min_clients=2" in stop[0], out
        assert "Traceback" not in out and "Exit Code: 201" not in out, out
        assert stop[0][len("cllora: ") :] in (tmp_path / "runs" / "stop" / "run.log").read_text()

        out = fed.flwr_run(app, f"overrides='{overrides('go', 1)}'")
    run_dir = tmp_path / "runs" / "go"
    assert "Traceback" not in out and "Exit Code" not in out, out
    log = (run_dir / "run.log").read_text()
    assert f"left out of the run: {malformed}" in log and f"left out of the run: {missing}" in log
    assert [r["succeeded"] for r in records_of(run_dir, "round")] == [1], out
    assert json.loads((run_dir / "flower.json").read_text())["sites"].keys() == {"site-a"}
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
