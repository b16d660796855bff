"""Where snapshot copies go on several nodes (trainer.placement): writers, homes and the shard
transfers of a sharded snapshot, for the layouts torchrun produces and a few it could."""

from __future__ import annotations

from collections import Counter

import pytest

from storage.manifest import FileEntry
from trainer.errors import SnapshotError
from trainer.placement import CopyPlan, settle_homes, shard_transfers
from trainer.sharded import _check_copies

pytestmark = pytest.mark.timeout(30)


def _nodes(n_nodes: int, per_node: int) -> list[tuple[int, int]]:
    """torchrun's numbering: rank = node * per_node + local rank."""
    return [(r // per_node, r % per_node) for r in range(n_nodes * per_node)]


def _leaders(nodes: list[tuple[int, int]]) -> dict[int, int]:
    """Node copies, every node its own disk: each node's local rank 0 writes."""
    return {node: r for r, (node, lr) in enumerate(nodes) if lr == 0}


def _plan(nodes: list[tuple[int, int]], owners: dict[int, int] | None) -> CopyPlan:
    writers, homes = settle_homes(nodes, owners)
    return CopyPlan.make(writers, homes, [lr for _n, lr in nodes])


def _copies(plan: CopyPlan, world: int) -> dict[int, set[int]]:
    """For each writer, the ranks whose shard file ends up in its directory."""
    held = {w: {r for r in range(world) if plan.homes[r] == w} for w in plan.writers}
    for sender, carrier in plan.transfers:
        home = plan.homes[carrier]
        assert home is not None
        assert sender not in held[home], "a file written twice into one copy"
        held[home].add(sender)
    return held


def test_one_node_writes_one_copy_with_no_transfer() -> None:
    nodes = _nodes(1, 4)
    plan = _plan(nodes, _leaders(nodes))
    assert plan.writers == (0,) and plan.homes == (0, 0, 0, 0) and plan.transfers == ()


@pytest.mark.parametrize("n_nodes, per_node", [(2, 1), (2, 4), (3, 2), (4, 8)])
def test_node_copies_put_every_shard_in_every_copy_pairing_local_ranks(n_nodes: int, per_node: int) -> None:
    nodes = _nodes(n_nodes, per_node)
    plan = _plan(nodes, _leaders(nodes))
    world = n_nodes * per_node
    assert plan.writers == tuple(range(0, world, per_node))
    assert all(held == set(range(world)) for held in _copies(plan, world).values())
    # Each rank sends its file once per other node and carries one file per other node, from
    # the rank with its own local rank: the exchange is spread evenly over every rank.
    sent = Counter(s for s, _c in plan.transfers)
    carried = Counter(c for _s, c in plan.transfers)
    assert set(sent.values()) == set(carried.values()) == {n_nodes - 1}
    assert all(nodes[s][1] == nodes[c][1] for s, c in plan.transfers)
    assert all(nodes[s][0] != nodes[c][0] for s, c in plan.transfers)


def test_without_node_copies_other_nodes_send_everything_to_rank_zeros_node() -> None:
    nodes = _nodes(2, 2)
    plan = _plan(nodes, None)
    assert plan.writers == (0,) and plan.homes == (0, 0, None, None)
    assert plan.transfers == ((2, 0), (3, 1))
    assert _copies(plan, 4) == {0: {0, 1, 2, 3}}


def test_a_directory_shared_between_nodes_is_written_once_with_no_transfer() -> None:
    # Three nodes on one NFS dir: the probes name rank 0 as every node's owner.
    nodes = _nodes(3, 2)
    plan = _plan(nodes, {0: 0, 1: 0, 2: 0})
    assert plan.writers == (0,) and set(plan.homes) == {0} and plan.transfers == ()


def test_two_shared_directories_and_a_private_one() -> None:
    # Nodes 0 and 1 share a dir, node 2 has its own.
    nodes = _nodes(3, 2)
    plan = _plan(nodes, {0: 0, 1: 0, 2: 4})
    assert plan.writers == (0, 4)
    assert _copies(plan, 6) == {0: set(range(6)), 4: set(range(6))}
    # Node 2's two ranks carry the four files of the shared dir; nodes 0-1's four ranks
    # share the two files of node 2.
    assert Counter(c for _s, c in plan.transfers if plan.homes[c] == 4) == {4: 2, 5: 2}


def test_owners_seen_through_a_lagging_listing_resolve_to_one_writer() -> None:
    # Node 2 saw node 1's probe, node 1 saw node 0's: one directory, written by rank 0 once.
    nodes = _nodes(3, 1)
    plan = _plan(nodes, {0: 0, 1: 0, 2: 1})
    assert plan.writers == (0,) and plan.homes == (0, 0, 0) and plan.transfers == ()


def test_uneven_nodes_still_reach_every_copy() -> None:
    nodes = [(0, 0), (0, 1), (0, 2), (1, 0)]
    plan = _plan(nodes, {0: 0, 1: 3})
    assert _copies(plan, 4) == {0: {0, 1, 2, 3}, 3: {0, 1, 2, 3}}
    assert Counter(c for _s, c in plan.transfers if c == 3) == {3: 3}


@pytest.mark.parametrize(
    "nodes, owners, match",
    [
        ([(0, 0), (1, 0)], {0: 0}, "no leader"),
        ([(0, 0), (1, 0)], {0: 1, 1: 1}, "inconsistent"),
        ([(0, 0), (0, 1), (1, 0)], {0: 1, 1: 2}, "inconsistent"),
    ],
)
def test_inconsistent_owners_are_refused(
    nodes: list[tuple[int, int]], owners: dict[int, int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        settle_homes(nodes, owners)


def test_a_writer_with_no_rank_in_its_directory_is_refused() -> None:
    with pytest.raises(ValueError, match="no rank"):
        shard_transfers([0, 0], [0, 1], [0, 1])


def _entry(fill: str) -> FileEntry:
    return FileEntry(size=10, checksum=fill * 64)


def _report(name: str, entry: FileEntry, carried: list[tuple[str, FileEntry]]) -> tuple[object, ...]:
    return ("ok", name, entry, [], [], carried)


def test_rank0_refuses_a_copy_missing_a_shard_or_holding_a_different_one() -> None:
    """Two nodes of one rank: each copy holds its own shard and the other node's, carried."""
    plan = _plan(_nodes(2, 1), {0: 0, 1: 1})
    a, b = _entry("a"), _entry("b")
    good = [_report("shard-00000.bin", a, [("shard-00001.bin", b)]),
            _report("shard-00001.bin", b, [("shard-00000.bin", a)])]
    _check_copies(plan, good)
    torn = [good[0], _report("shard-00001.bin", b, [("shard-00000.bin", _entry("c"))])]
    with pytest.raises(SnapshotError, match="differs from its owner"):
        _check_copies(plan, torn)
    lost = [good[0], _report("shard-00001.bin", b, [])]
    with pytest.raises(SnapshotError, match="lacks"):
        _check_copies(plan, lost)
