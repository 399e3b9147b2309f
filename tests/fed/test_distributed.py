"""The collectives of cllora.fed.distributed, in real gloo process groups of 2 and 3 processes."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cllora.fed.distributed import DistContext


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(i: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {
        "m.lora_A": torch.randn(rank, 7, generator=g),
        "m.lora_B": torch.randn(5, rank, generator=g),
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    ctx = DistContext.from_env()
    assert ctx is not None and ctx.rank == rank and ctx.world == world
    n_clients, failed = 7, {3}
    ranks = {i: 2 + i % 3 for i in range(n_clients)}  # heterogeneous ranks
    local = {i: (None if i in failed else _state(i, ranks[i])) for i in ctx.owned(range(n_clients))}
    templates = {
        i: {k: torch.empty_like(v) for k, v in _state(i, ranks[i]).items()}
        for i in range(n_clients)
    }
    shared = ctx.share_states(local, templates)
    gathered = ctx.all_gather_json({"rank": rank, "owned": ctx.owned(range(n_clients)), "x": "é"})
    flat = {f"{i}/{k}": v for i, s in shared.items() for k, v in s.items()}
    save_file(flat, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(gathered, fh)
    ctx.close()


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_every_client_state(tmp_path, world):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    expected = {f"{i}/{k}": v for i in range(7) if i != 3 for k, v in _state(i, 2 + i % 3).items()}
    for r in range(world):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
        gathered = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert [g["rank"] for g in gathered] == list(range(world))
        assert sorted(i for g in gathered for i in g["owned"]) == list(range(7))
        assert gathered[0]["x"] == "é"


def test_not_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert DistContext.from_env() is None
