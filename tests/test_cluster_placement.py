"""Which node and GPUs each replica gets across a Ray cluster (servers/cluster/node_placement),
on nodes as their agents report them: a TP group never spans nodes, the one-host "same PCIe
switch" rule holds per node, and nodes fill one by one so whole nodes stay free. No Ray needed:
placement works on the nodes' reports."""
from __future__ import annotations

import pytest

from servers.cluster.node_placement import Node, place_on_nodes
from servers.launcher import LayoutError, layout_from_dict
from test_placement import build_topology

NVLINK4 = build_topology([[0, 1, 2, 3]], [0], nvlink={(a, b): 18 for a in range(4)
                                                      for b in range(a + 1, 4)})
NO_SWITCH4 = build_topology([[0], [1], [2], [3]], [0, 0, 1, 1])   # pairs cross at best a NUMA node


def node(name: str, topo=NVLINK4) -> Node:
    return Node(node_id=name * 8, address=f"10.0.0.{ord(name) - 96}", gpus=tuple(topo.gpus),
                topology=topo, topology_source="recorded")


def layout(*roles: tuple[str, int, object]):
    return layout_from_dict({"name": "t", "servers": [
        {"role": r, "model": "meta-llama/Meta-Llama-3-70B-Instruct-AWQ" if tp > 1
         else "meta-llama/Meta-Llama-3-8B-Instruct", "precision": "awq" if tp > 1 else "bf16",
         "tensor_parallel_size": tp, "replicas": n} for r, tp, n in roles]})


def placed(p) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(a.name, a.node.address, a.assignment.gpus) for a in p.assignments]


def test_replicas_fill_one_node_before_the_next_so_whole_nodes_stay_free():
    p = place_on_nodes(layout(("large", 2, 1), ("small", 1, 2)), [node("a"), node("b"), node("c")])
    assert {addr for _, addr, _ in placed(p)} == {"10.0.0.1"}
    assert [n.address for n in p.free_nodes] == ["10.0.0.2", "10.0.0.3"]


def test_a_tp_pair_goes_to_the_node_whose_gpus_share_a_link_not_the_first_with_room():
    p = place_on_nodes(layout(("large", 2, 2)), [node("a", NO_SWITCH4), node("b")])
    assert placed(p) == [("large-0", "10.0.0.2", (0, 1)), ("large-1", "10.0.0.2", (2, 3))]


def test_a_tp_pair_no_node_can_link_is_refused_with_that_nodes_reason():
    with pytest.raises(LayoutError, match=r"replica large-2 \(TP=2\) fits on no node: on node "
                                          r"10\.0\.0\.1 .*same PCIe switch required"):
        place_on_nodes(layout(("large", 2, 3)), [node("a", NO_SWITCH4), node("b")])


def test_fill_roles_take_what_the_fixed_roles_left_on_every_node():
    p = place_on_nodes(layout(("large", 2, 3), ("small", 1, "fill")), [node("a"), node("b")])
    names = [n for n, _, _ in placed(p)]
    assert names.count("large-0") == 1 and sum(n.startswith("small-") for n in names) == 2
    assert sorted(g for _, _, gpus in placed(p) for g in gpus) == [0, 0, 1, 1, 2, 2, 3, 3]
