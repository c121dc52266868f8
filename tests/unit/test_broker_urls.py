"""Several broker node URLs: how settings split them and where a worker starts."""

from __future__ import annotations

import pytest

from worker.settings import split_urls
from worker.transport.amqp import rotated

NODES = ("amqps://127.0.0.1:1/sam", "amqps://127.0.0.1:2/sam", "amqps://127.0.0.1:3/sam")


def test_one_url_or_a_comma_separated_list() -> None:
    assert split_urls("amqps://h/sam?auth=external") == ("amqps://h/sam?auth=external",)
    assert split_urls(" , ".join(NODES) + ",") == NODES
    with pytest.raises(ValueError, match="no broker URL"):
        split_urls(" , ")


def test_a_worker_tries_every_node_once_per_round_from_a_place_its_name_picks() -> None:
    for name in ("worker-1", "worker-2", "host-a-4242"):
        order = rotated(NODES, name)
        assert sorted(order) == sorted(NODES)
        assert order == rotated(NODES, name)  # stable for a name
        start = NODES.index(order[0])
        assert order == list(NODES[start:] + NODES[:start])  # the listed order, rotated
    # replicas spread over the nodes rather than all starting at the first
    assert len({rotated(NODES, f"worker-{i}")[0] for i in range(1, 10)}) == 3
