"""Where each copy of a snapshot is written on several nodes, and how shard files reach it.

Pure functions over what the ranks told each other once (their node, their local rank, which
writer owns their node's checkpoint dir), so the plan is the same on every rank without another
collective and is unit-tested without processes. A *writer* is a rank that commits a copy of
each snapshot into its node's checkpoint dir (global rank 0; with node copies, every node's
local rank 0 whose dir is not shared with a lower writer). A rank's *home* is the writer whose
directory is its own node's (None: its node holds no copy, ``--no-node-copies``).

DDP needs only the writers (every rank holds the whole state). A sharded (FSDP) snapshot needs
every rank's shard file in every copy: a rank writes its own file into its home directory and
sends it over the network to one *carrier* on each other writer's node, which writes it there.
Carriers are paired by local rank, so on ``N`` nodes of ``k`` ranks each rank sends its shard
``N - 1`` times and receives ``N - 1`` shards, all ranks in parallel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CopyPlan:
    """Where a sharded snapshot's copies go: the same on every rank."""

    #: The ranks committing a copy, one per checkpoint directory (global rank 0 first).
    writers: tuple[int, ...]
    #: Per rank: the writer whose directory it writes its own shard file into (None: none).
    homes: tuple[int | None, ...]
    #: ``(sender, carrier)``: the sender's shard file goes to the carrier's home directory.
    transfers: tuple[tuple[int, int], ...]

    @classmethod
    def make(cls, writers: Sequence[int], homes: Sequence[int | None], local_ranks: Sequence[int]) -> CopyPlan:
        return cls(writers=tuple(writers), homes=tuple(homes),
                   transfers=shard_transfers(homes, writers, local_ranks))


def settle_homes(
    nodes: Sequence[tuple[int, int]], owners: Mapping[int, int] | None
) -> tuple[tuple[int, ...], tuple[int | None, ...]]:
    """``(writers, homes)`` from every rank's ``(node, local rank)``.

    ``owners``: for each node, the rank that writes into that node's checkpoint dir (from the
    probe files: the lowest node leader sharing the dir); None without node copies, when only
    global rank 0 writes and ranks on other nodes have no home.
    """
    if not nodes:
        raise ValueError("no ranks")
    if owners is None:
        node0 = nodes[0][0]
        return (0,), tuple(0 if node == node0 else None for node, _lr in nodes)
    missing = sorted({node for node, _lr in nodes} - set(owners))
    if missing:
        raise ValueError(f"nodes {missing} have no leader (local rank 0)")

    def home(node: int) -> int:
        # Probes seen through a lagging NFS listing can name an owner that itself saw an even
        # lower one: the directories are then all the same, so follow the chain to its end.
        r, seen = owners[node], set()
        while 0 <= r < len(nodes) and owners.get(nodes[r][0], r) != r and r not in seen:
            seen.add(r)
            r = owners[nodes[r][0]]
        return r

    homes = tuple(home(node) for node, _lr in nodes)
    writers = tuple(sorted(set(homes)))
    if writers[0] != 0 or any(not 0 <= w < len(nodes) or homes[w] != w for w in writers):
        raise ValueError(f"inconsistent checkpoint dir owners {dict(owners)}")
    return writers, homes


def shard_transfers(
    homes: Sequence[int | None], writers: Sequence[int], local_ranks: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """Every ``(sender, carrier)`` pair: each rank's shard file to one rank of each writer's
    directory that the rank does not write into itself.

    A sender goes to a carrier with its own local rank (round-robin when the directory has
    several, e.g. one shared by several nodes), else round-robin over all the directory's
    ranks; with the same number of ranks per node each carrier then takes exactly one file per
    other node, from the rank with its own local rank.
    """
    if len(homes) != len(local_ranks):
        raise ValueError("homes and local_ranks differ in length")
    pairs: list[tuple[int, int]] = []
    ranks = range(len(homes))
    for w in writers:
        carriers = sorted((r for r in ranks if homes[r] == w), key=lambda r: (local_ranks[r], r))
        if not carriers:
            raise ValueError(f"writer {w} has no rank writing into its directory")
        by_local: dict[int, list[int]] = {}
        for c in carriers:
            by_local.setdefault(local_ranks[c], []).append(c)
        used: dict[int, int] = {}
        spill = 0
        for s in sorted((r for r in ranks if homes[r] != w), key=lambda r: (local_ranks[r], r)):
            same = by_local.get(local_ranks[s])
            if same:
                i = used.get(local_ranks[s], 0)
                used[local_ranks[s]] = i + 1
                pairs.append((s, same[i % len(same)]))
            else:
                pairs.append((s, carriers[spill % len(carriers)]))
                spill += 1
    return tuple(sorted(pairs))
