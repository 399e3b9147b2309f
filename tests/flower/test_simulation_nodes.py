"""A Flower simulation runs one virtual SuperNode per client: without ``--nodes`` it counts the
config's clients; a ``--nodes`` that is not that number is refused in one line before Flower
starts."""

from __future__ import annotations

import pytest

from cllora.cli import main
from cllora.config import Config, load_config

pytest.importorskip("flwr")
pytest.importorskip("ray")


def test_flower_simulate_nodes_default_to_the_configs_clients():
    from cllora.flower.simulation import simulation_nodes

    assert simulation_nodes(load_config("examples/demo.yaml")) == 5  # field: 5 sources
    assert (
        simulation_nodes(load_config(None, ["partition.method=iid"]))
        == Config().partition.num_clients
    )


@pytest.mark.parametrize("nodes, clients", [(4, 5), (6, 5)])
def test_flower_simulate_refuses_nodes_that_are_not_the_clients(tmp_path, capsys, nodes, clients):
    """Intermixed options and overrides parse; the mismatch is one line and exit status 2 before
    Flower starts (no run directory)."""
    argv = ["flower", "simulate", "examples/demo.yaml", "--nodes", str(nodes), "fed.rounds=1",
            f"out_dir={tmp_path / 'runs'}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"cllora: error: --nodes {nodes} but the partition has {clients} clients (one per value "
        f"of 'source' in builtin): a simulation runs one virtual SuperNode per client ("
        f"{'a client would never train' if nodes < clients else 'a node would hold no client'}"
        f"); give --nodes {clients} or leave --nodes out"
    ]
    assert not (tmp_path / "runs").exists()
