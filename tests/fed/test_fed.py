from __future__ import annotations

import json
import random

import pytest
import torch

from cllora.config import load_config
from cllora.data.formatting import Sample
from cllora.data.partition import make_clients
from cllora.data.readers import DataError
from cllora.fed.client import NonFiniteLossError, client_update
from cllora.fed.server import client_seed, prepare, run_experiment, sample_clients
from cllora.fed.strategy import client_weights, fedavg
from cllora.model.batching import batch_stream, collate
from cllora.model.lora import lora_parameters, lora_state_dict
from tests.conftest import metrics_without_times, tiny_run_overrides


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(3, 5, generator=g), "a.lora_B": torch.randn(7, 3, generator=g)}


def test_fedavg_of_identical_adapters_is_that_adapter():
    s = _state(0)
    out = fedavg([s, {k: v.clone() for k, v in s.items()}, s], client_weights([5, 1, 9], "samples"))
    for k in s:
        torch.testing.assert_close(out[k], s[k])


def test_fedavg_weights_by_samples():
    a, b = _state(1), _state(2)
    w = client_weights([30, 10], "samples")
    assert w == pytest.approx([0.75, 0.25])
    out = fedavg([a, b], w)
    torch.testing.assert_close(out["a.lora_B"], 0.75 * a["a.lora_B"] + 0.25 * b["a.lora_B"])
    assert client_weights([30, 10], "uniform") == [0.5, 0.5]
    with pytest.raises(ValueError, match="different keys"):
        fedavg([a, {"x": a["a.lora_A"]}], [0.5, 0.5])


def test_sample_clients_fraction():
    rng = random.Random(0)
    assert sample_clients(5, 1.0, rng) == [0, 1, 2, 3, 4]
    picked = sample_clients(10, 0.3, rng)
    assert len(picked) == 3 and picked == sorted(set(picked))
    assert len(sample_clients(3, 0.01, rng)) == 1


def test_one_client_one_round_equals_plain_local_training(tmp_path):
    cfg = load_config(
        None,
        tiny_run_overrides(
            tmp_path,
            fed__rounds=1,
            partition__method="iid",
            partition__num_clients=1,
            fed__eval_initial=False,
        ),
    )
    result = run_experiment(cfg)

    # The same thing written as a plain training loop, with HF's own loss (labels shifted inside).
    model, tokenizer, clients = prepare(cfg)
    (client,) = clients
    seed = client_seed(cfg.seed, 1, 0)
    stream = batch_stream(client.train, cfg.train.batch_size, torch.Generator().manual_seed(seed))
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()
    for _ in range(cfg.train.local_steps):
        loss = model(**collate(next(stream), tokenizer.pad_token_id)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
    plain = lora_state_dict(model)
    assert plain.keys() == result.global_state.keys()
    for k in plain:
        torch.testing.assert_close(result.global_state[k], plain[k], rtol=1e-4, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in plain.items() if k.endswith("lora_B"))


def test_loss_goes_down_and_outputs_exist(tmp_path):
    cfg = load_config(
        None, tiny_run_overrides(tmp_path, fed__rounds=3, train__local_steps=4, run_name="r")
    )
    result = run_experiment(cfg)
    losses = [row["global_loss"] for row in result.rows]
    assert len(losses) == 4  # round 0 + 3 rounds
    assert losses[-1] < losses[0] - 0.05, losses
    run = tmp_path / "r"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.csv",
        "run.log",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == cfg
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"client_train", "global_eval", "round"} <= kinds
    n_clients = len([c for c in result.rows[0] if c.startswith("loss[")])
    assert sum(r["kind"] == "client_train" for r in records) == 3 * n_clients
    rounds = [r for r in records if r["kind"] == "round"]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] == r["bytes_up"] for r in rounds)
    with pytest.raises(FileExistsError):
        run_experiment(cfg)  # never overwrite a finished run


def test_same_config_and_seed_give_same_metrics(tmp_path):
    a = run_experiment(load_config(None, tiny_run_overrides(tmp_path, run_name="a")))
    b = run_experiment(load_config(None, tiny_run_overrides(tmp_path, run_name="b")))
    c = run_experiment(load_config(None, tiny_run_overrides(tmp_path, run_name="c", seed=1)))
    assert metrics_without_times(a.run_dir) == metrics_without_times(b.run_dir)
    assert metrics_without_times(a.run_dir) != metrics_without_times(c.run_dir)


def test_nan_loss_is_reported_not_trained_on(tmp_path):
    cfg = load_config(None, tiny_run_overrides(tmp_path))
    model, tokenizer, clients = prepare(cfg)
    state = lora_state_dict(model)
    key = next(k for k in state if k.endswith("lora_B"))
    state[key] = torch.full_like(state[key], float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 0"):
        client_update(model, state, clients[0].train, cfg.train, tokenizer.pad_token_id, seed=0)


def _sample(source: str) -> Sample:
    return Sample(
        input_ids=[1, 2, 3], labels=[-100, 2, 3], meta={"source": source}, truncated=False
    )


def test_a_client_too_small_to_split_is_an_error():
    cfg = load_config(None, ["partition.method=field"]).partition
    samples = [_sample("big") for _ in range(10)] + [_sample("tiny")]
    with pytest.raises(DataError, match="client 'tiny' has 1 sample"):
        make_clients(samples, cfg, seed=0)
    clients = make_clients(samples[:10], cfg, seed=0)
    assert [(c.name, len(c.train), len(c.test)) for c in clients] == [("big", 9, 1)]


def test_missing_partition_field_is_an_error():
    cfg = load_config(None, ["partition.field=hospital"]).partition
    with pytest.raises(DataError, match=r"partition\.field='hospital' is missing"):
        make_clients([_sample("a")] * 4, cfg, seed=0)
