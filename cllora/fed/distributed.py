"""Collectives for running the federated loop over several processes with torch.distributed.

Usage (inside a process started by ``torchrun --nproc-per-node N -m cllora run CONFIG``)::

    from cllora.fed.distributed import DistContext

    ctx = DistContext.from_env()                 # None when not started by torchrun
    mine = ctx.owned(range(n_clients))           # the clients this rank trains and evaluates
    states = ctx.share_states(local_states, templates)   # every rank gets every client's adapter
    rows = ctx.all_gather_json(my_metrics)       # small JSON-able results from every rank

Design: clients are dealt round-robin over the ranks (client i lives on rank i % world). After
local training every rank receives every successful client's adapter (one flat fp32 buffer per
client, broadcast by its owner), so every rank runs the same pure aggregation on the same inputs
and holds the same global adapter — no parameter server, no pickling (JSON travels as UTF-8
bytes in uint8 tensors). gloo on CPU, NCCL on GPU (tensors are moved to the rank's device).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

State = dict[str, torch.Tensor]


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device

    @staticmethod
    def from_env() -> DistContext | None:
        """Join the process group torchrun set up (``WORLD_SIZE`` > 1); None otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)
        rank = dist.get_rank()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        return DistContext(rank=rank, world=dist.get_world_size(), device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, client_idx: int) -> int:
        """The rank that trains and evaluates client ``client_idx``."""
        return client_idx % self.world

    def owned(self, clients: Iterable[int]) -> list[int]:
        """The clients (of those given) that live on this rank."""
        return [i for i in clients if self.owner(i) == self.rank]

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able ``obj``, in rank order, on every rank."""
        payload = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.long, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        buf[: payload.numel()] = payload.to(self.device)
        bufs = [torch.zeros_like(buf) for _ in range(self.world)]
        dist.all_gather(bufs, buf)
        return [
            json.loads(bytes(b[: int(n.item())].cpu().tolist()).decode("utf-8"))
            for b, n in zip(bufs, sizes, strict=True)
        ]

    def share_states(
        self, local: dict[int, State | None], templates: dict[int, State]
    ) -> dict[int, State]:
        """Every client's adapter on every rank.

        ``local``: this rank's results, client index -> state, or None for a client that
        failed. ``templates``: for every client index trained this round (on any rank), a state
        with the keys and shapes its adapter has (e.g. the state sent to it). Returns the
        states of the clients that succeeded, in client order, identical on every rank, on each
        template tensor's device and dtype.
        """
        shared: dict[int, State] = {}
        for i in sorted(templates):
            template = templates[i]
            flag = torch.zeros(1, device=self.device)
            numel = sum(t.numel() for t in template.values())
            buf = torch.zeros(numel, dtype=torch.float32, device=self.device)
            if self.owner(i) == self.rank and local.get(i) is not None:
                flag.fill_(1.0)
                buf.copy_(torch.cat([local[i][k].reshape(-1).float() for k in template]))
            dist.broadcast(flag, src=self.owner(i))
            if flag.item() == 0:
                continue
            dist.broadcast(buf, src=self.owner(i))
            state, offset = {}, 0
            for k, t in template.items():
                state[k] = buf[offset : offset + t.numel()].view(t.shape).to(t.device, t.dtype)
                offset += t.numel()
            shared[i] = state
        return shared

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
