"""cllora's Flower pieces without Ray or a SuperLink: the real ClientApp called in-process with
real Flower Messages (Flower's fixedclipping_mod included), whole federations over an in-process
grid (secure aggregation with Flower's SecAgg+ workflow and mod), the records, the refusals, the
app directory (validated by Flower), certificates and keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.differential_privacy import compute_stdv

from cllora.cli import main as cli_main
from cllora.config import ConfigError, config_to_dict, load_config
from cllora.fed.algorithms.base import Downlink, Uplink
from cllora.flower import client_app
from cllora.flower.client_app import CONFIG_KEY, app
from cllora.flower.messages import (
    USER_ERROR,
    config_content,
    downlink_content,
    read_downlink,
    read_error,
    read_uplink,
    uplink_content,
)
from cllora.flower.node import node_for
from cllora.flower.pool import (
    FlowerSettings,
    add_noise,
    check_flower_config,
    combine_evals,
    run_federation,
)
from cllora.flower.privacy import epsilon_after
from cllora.model.lora import lora_state_dict
from cllora.report.records import ClientFailed, GlobalEval
from tests.conftest import metrics_without_times, tiny_run_overrides
from tests.flower.grid import InProcessGrid


def _norm(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in b)))


def test_client_app_trains_and_flowers_mod_clips_the_update(tmp_path, task_identity):
    cfg = load_config(None, tiny_run_overrides(
        tmp_path, partition__method="iid", partition__num_clients=2, train__threads=1))  # fmt: skip
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    node = node_for(text, {"partition-id": 1})
    start = dict(reversed(lora_state_dict(node.model).items()))  # any order (a checkpoint's)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(),
                  run_config={})  # fmt: skip
    norms = {}
    for kind, extra in (("train", {}), ("train.dp", {"clipping_norm": 1e-3})):
        conf = {CONFIG_KEY: text, "round": 1, "index": 1, "steps": 3, "fail": False,
                "position": 0, **extra}  # fmt: skip
        msg = Message(downlink_content(Downlink(start), conf), dst_node_id=1, message_type=kind)
        reply = app(msg, ctx)
        assert not reply.has_error(), reply.error
        up, records, _ = read_uplink(reply.content)
        assert [r.kind for r in records] == ["client_train", "local_eval", "local_eval"]
        assert records[0].client == "client-01" and len(records[0].losses) == 3
        norms[kind] = _norm(up.adapter, start)
    assert norms["train"] > 1e-2  # three AdamW steps at lr 5e-3 move far more than 1e-3
    assert norms["train.dp"] == pytest.approx(1e-3, rel=1e-4)


def _malformed(path: Path) -> Path:
    path.write_text('{"question": "q?", "answer": "a"}\n{"question": "broken?"\n')  # line 2
    return path


def test_client_app_replies_errors_naming_the_node(tmp_path, task_identity, monkeypatch):
    text = yaml.safe_dump(config_to_dict(load_config(None, tiny_run_overrides(tmp_path))))
    bad, gone = _malformed(tmp_path / "b.jsonl"), tmp_path / "c.jsonl"

    def query(node_config: dict) -> tuple:
        ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={})  # fmt: skip
        msg = Message(config_content({CONFIG_KEY: text}), dst_node_id=7, message_type="query")
        reply = app(msg, ctx)
        return reply.error.code, *read_error(reply.error)

    code, name, line, trace = query({"data-path": str(bad), "name": "site-b"})
    assert (code, name, trace) == (USER_ERROR, "site-b", "")
    assert line.startswith(f"{bad}:2: malformed record: not valid JSON") and "skip" in line
    code, name, line, _ = query({"data-path": str(gone)})  # no name: the file's stem
    assert (code, name) == (USER_ERROR, "c")
    assert line.startswith(f"data-path {gone} not found on this SuperNode: restart it")
    code, name, line, _ = query({})
    assert (code, name) == (USER_ERROR, "node id 7") and "--node-config" in line

    def bug(*args):
        return 1 / 0

    monkeypatch.setattr(client_app, "node_for", bug)
    code, name, line, trace = query({"partition-id": 1})
    assert (code, name, line) == (2, "partition-id 1", "unexpected ZeroDivisionError: division "
                                  "by zero")  # Flower's CLIENT_APP_RAISED_EXCEPTION  # fmt: skip
    assert trace.startswith("Traceback") and trace.endswith("ZeroDivisionError: division by zero")


def test_nodes_that_cannot_load_their_data_stop_the_run_in_one_line(tmp_path, task_identity):
    bad = _malformed(tmp_path / "all.jsonl")
    cfg = load_config(None, tiny_run_overrides(
        tmp_path, partition__method="iid", partition__num_clients=3, train__threads=1,
        run_name="bad", data__path=str(bad), data__format="jsonl"))  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run_federation(InProcessGrid(3), cfg, FlowerSettings(nodes=3))
    line = str(err.value)
    assert "\n" not in line  # the virtual nodes read the same file: one error, all its nodes
    assert line.startswith(f"SuperNodes partition-id 0, partition-id 1, partition-id 2: {bad}:2:")
    assert line.endswith("(0 of 3 SuperNodes loaded their client, fewer than fed.min_clients=1)")
    assert f"ERROR cllora: error: {line}" in (tmp_path / "bad" / "run.log").read_text()


def test_messages_round_trip_keep_tensors_and_records():
    state = {"m.lora_A": torch.randn(2, 5), "m.lora_B": torch.randn(5, 2, dtype=torch.bfloat16)}
    down = Downlink(state, extra={"c": {"m.lora_A": torch.ones(2, 5)}})
    back, conf = read_downlink(downlink_content(down, {"round": 3, "x": "y"}))
    assert conf == {"round": 3, "x": "y"}
    assert torch.equal(back.adapter["m.lora_A"], state["m.lora_A"])
    assert torch.equal(back.adapter["m.lora_B"], state["m.lora_B"].float())  # bf16 -> fp32
    assert torch.equal(back.extra["c"]["m.lora_A"], torch.ones(2, 5))
    failed = [ClientFailed(round=1, client="a", error="boom")]
    up, records, _ = read_uplink(uplink_content(None, failed, {"position": 0}))
    assert up is None and records == failed
    up, _, _ = read_uplink(uplink_content(Uplink(state), [], {}))
    assert set(up.adapter) == set(state)


def _eval(client: str, sums: list[float], tokens: int, buckets: dict) -> GlobalEval:
    loss = sum(sums) / tokens
    return GlobalEval(round=2, client=client, loss=loss, ppl=math.exp(loss), tokens=tokens,
                      buckets=buckets, loss_sums=sums)  # fmt: skip


def test_combine_evals_is_the_union_of_the_test_sets():
    a = _eval("a", [2.0, 4.0], 3, {"<8": {"loss": 2.0, "tokens": 3}})
    b = _eval("b", [6.0], 1, {"<8": {"loss": 4.0, "tokens": 1}, "8+": {"loss": 1.0, "tokens": 2}})
    whole = combine_evals([a, b], 2)
    assert (whole.client, whole.round, whole.tokens) == ("__global__", 2, 4)
    assert whole.loss == pytest.approx(12.0 / 4) and whole.ppl == pytest.approx(math.exp(3.0))
    assert whole.loss_sums == [2.0, 4.0, 6.0]
    assert whole.buckets["<8"] == pytest.approx({"loss": (6.0 + 4.0) / 4, "tokens": 4})
    assert whole.buckets["8+"] == {"loss": 1.0, "tokens": 2}


@pytest.mark.parametrize(
    ("overrides", "settings", "says"),
    [
        (["fed.strategy=fedsa"], {}, "measured with every client's own B"),
        (["fed.strategy=local_only"], {}, "exports every client's own adapter"),
        (["fed.strategy=flora"], {}, "base weights"),
        (["fed.strategy=centralized"], {}, "every client's data in one place"),
        (["fed.strategy=scaffold"], {"secagg": True}, "also carry delta_c"),
        (["partition.global_test_fraction=0.2"], {}, "global_test_fraction=0"),
        (["eval.generate_samples=2"], {}, "generate_samples=0"),
        (["fed.weighting=uniform", "fed.strategy=fedadam"], {"dp_clipping_norm": 1.0},
         "uniform mean"),
        ([], {"dp_clipping_norm": 1.0}, "fed.weighting=uniform"),
        ([], {"dp_noise_multiplier": 1.0}, "needs dp-clipping-norm"),
        ([], {"dp_delta": 1.0}, "dp-delta must be in"),
        (["fed.strategy=exact"], {"secagg": True}, "fed.strategy=exact reads each one"),
        (["fed.strategy=hetlora"], {"secagg": True}, "fed.strategy=hetlora reads each one"),
        (["lora.client_ranks=[2,4]"], {"secagg": True}, "different ranks"),
        (["fed.sample_fraction=0.2"], {"secagg": True, "nodes": 4}, "at least 2"),
        ([], {"secagg": True, "nodes": 3, "secagg_reconstruction_threshold": 4.0}, "exceeds the 3"),
        ([], {"secagg": True, "secagg_num_shares": 2.0}, "Flower refuses them"),
        ([], {"secagg": True, "secagg_num_shares": 2.5}, "secagg-num-shares=2.5: give"),
    ],
)  # fmt: skip
def test_refusals_name_the_fix(overrides, settings, says):
    with pytest.raises(ConfigError, match=says):
        check_flower_config(load_config(None, overrides), FlowerSettings(**settings))


def test_cli_refuses_in_one_line(tmp_path, capsys):
    code = cli_main(["flower", "simulate", "fed.strategy=fedsa", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fed.strategy=fedsa" in err[0], err


def test_cli_without_flower_names_the_extra(monkeypatch, capsys):
    monkeypatch.setattr("cllora.flower._found", lambda module: module != "flwr")
    assert cli_main(["flower", "app", "somewhere"]) == 2
    assert 'pip install -e ".[flower]"' in capsys.readouterr().err


def test_noise_is_flowers_central_dp_and_recorded(tmp_path):
    cfg = load_config(None, ["fed.weighting=uniform", "seed=5"])
    settings = FlowerSettings(dp_clipping_norm=0.5, dp_noise_multiplier=2.0)
    state = {"w": torch.zeros(200, 300)}
    info = add_noise(settings, cfg.seed, 3, state, n=4)
    std = compute_stdv(2.0, 0.5, 4)
    assert info == {"dp_clipping_norm": 0.5, "dp_noise_multiplier": 2.0, "dp_noise_std": std}
    assert float(state["w"].std()) == pytest.approx(std, rel=0.02)
    again = {"w": torch.zeros(200, 300)}
    add_noise(settings, cfg.seed, 3, again, n=4)  # the same round of the same run: the same noise
    assert torch.equal(again["w"], state["w"])


def test_app_directory_is_a_valid_flower_app(tmp_path):
    import tomli
    from flwr.common.config import validate_config

    from cllora.flower.app_dir import write_app

    assert cli_main(["flower", "app", str(tmp_path / "app"), "fed.rounds=4", "--nodes", "3"]) == 0
    config = tomli.loads((tmp_path / "app" / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True)
    assert ok, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert run_config["overrides"] == "fed.rounds=4" and run_config["nodes"] == 3
    write_app(tmp_path / "quoted", overrides='run_name="a b"')
    assert tomli.loads((tmp_path / "quoted" / "pyproject.toml").read_text())


def test_certificates_verify_and_node_keys_load(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    assert cli_main(["flower", "certs", str(tmp_path), "--host", "127.0.0.1",
                     "--host", "link.example.org"]) == 0  # fmt: skip
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example.org" in names.get_values_for_type(x509.DNSName)
    assert cli_main(["flower", "keys", str(tmp_path / "keys"), "site-a"]) == 0
    key = load_ssh_private_key((tmp_path / "keys" / "site-a").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert Path(tmp_path / "keys" / "site-a.pub").read_text().startswith("ecdsa-sha2-nistp384")


def _federate(tmp_path, name: str, settings: FlowerSettings, drop: set | None = None, **extra):
    """A whole run over three in-process nodes (:class:`tests.flower.grid.InProcessGrid`)."""
    cfg = load_config(None, tiny_run_overrides(
        tmp_path, partition__method="iid", partition__num_clients=3, train__threads=1,
        run_name=name, **extra))  # fmt: skip
    grid = InProcessGrid(3, drop_masked=drop)
    return run_federation(grid, cfg, settings), grid


def _masked_replies(grid: InProcessGrid) -> list[Message]:
    """The nodes' replies to SecAgg+'s collect-masked-vectors stage."""
    out = []
    for m in grid.replies:
        conf = None if m.has_error() else m.content.config_records.get(RECORD_KEY_CONFIGS)
        if conf is not None and Key.MASKED_PARAMETERS in conf:
            out.append(m)
    return out


def _close_records(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    for x, y in zip(a, b, strict=True):
        for k, v in x.items():
            if k.startswith(("secagg", "bytes_up")):
                continue
            if isinstance(v, float):
                assert y[k] == pytest.approx(v, rel=rel, abs=1e-6), (x["kind"], k)
            elif k not in ("loss_sums", "losses", "buckets"):
                assert y[k] == v, (x["kind"], k)


def test_secagg_federation_is_the_weighted_mean_through_flowers_protocol(tmp_path, task_identity):
    extra = {"fed__weighting": "tokens", "fed__client_failure_rate": 0.3, "seed": 1,
             "fed__rounds": 1}  # seed 1: client-01 fails in round 1  # fmt: skip
    on = FlowerSettings(nodes=3, secagg=True)
    secure, grid = _federate(tmp_path, "secure", on, **extra)
    # client-01's node (id 2) trains, then drops out of SecAgg+: Flower recovers its masks
    dropout, _ = _federate(tmp_path, "dropout", on, drop={2},
                           **{**extra, "fed__client_failure_rate": 0.0})  # fmt: skip
    plain, _ = _federate(tmp_path, "plain", FlowerSettings(nodes=3), **extra)
    a, b = metrics_without_times(plain.run_dir), metrics_without_times(secure.run_dir)
    assert [r["client"] for r in b if r["kind"] == "client_failed"] == ["client-01"]
    _close_records(a, b, rel=1e-4)
    (plain_round,) = [r for r in a if r["kind"] == "round"]
    (rec,) = [r for r in b if r["kind"] == "round"]
    assert (rec["succeeded"], rec["secagg_num_shares"], rec["secagg_reconstruction_threshold"],
            rec["secagg_clipped"]) == (2, 3, 2, 0)  # fmt: skip
    assert rec["secagg"] and rec["bytes_up"] > 0 and rec["weights"] == plain_round["weights"]
    step = 2 * 8.0 / 2**22  # Flower's quantization step at the default ranges
    for k, t in plain.global_state.items():  # three stochastic roundings over weights 2/3
        torch.testing.assert_close(secure.global_state[k], t, rtol=0, atol=5 * step)
        torch.testing.assert_close(dropout.global_state[k], t, rtol=0, atol=5 * step)
    (failed,) = [r for r in metrics_without_times(dropout.run_dir) if r["kind"] == "client_failed"]
    assert failed["client"] == "client-01" and "left secure aggregation" in failed["error"]
    masked = _masked_replies(grid)
    assert len(masked) == 3  # the failed node takes part with weight 0; no array in the clear
    assert all(len(rec) == 0 for m in masked for rec in m.content.array_records.values())
    info = json.loads((secure.run_dir / "flower.json").read_text())
    assert info["settings"]["secagg"] and info["round"]["secagg_num_shares"] == 3


def test_secagg_composes_with_central_dp_and_epsilon_is_recorded(tmp_path, task_identity):
    extra = {"fed__weighting": "uniform", "fed__rounds": 1}
    dp = {"nodes": 3, "dp_clipping_norm": 1e-3, "dp_noise_multiplier": 1.0, "dp_delta": 1e-6}
    secure, _ = _federate(tmp_path, "secure", FlowerSettings(
        secagg=True, secagg_clipping_range=1e-3, **dp), **extra)  # fmt: skip
    plain, _ = _federate(tmp_path, "plain", FlowerSettings(**dp), **extra)
    a, b = metrics_without_times(plain.run_dir), metrics_without_times(secure.run_dir)
    _close_records(a, b, rel=1e-4)
    (rec,) = [r for r in b if r["kind"] == "round"]
    eps = epsilon_after(1, 1.0, 1e-6)[0]
    assert (rec["dp_epsilon"], rec["dp_delta"], rec["secagg_clipped"]) == (eps, 1e-6, 0)
    info = json.loads((secure.run_dir / "flower.json").read_text())
    assert info["round"]["dp_epsilon"] == eps and info["settings"]["dp_delta"] == 1e-6
    step = 2 * 1e-3 / 2**22  # the updates are clipped to 1e-3: so is the quantization range
    for k, t in plain.global_state.items():  # the same (seeded) noise on both; fp32 adapters
        torch.testing.assert_close(secure.global_state[k], t, rtol=1e-6, atol=5 * step)
