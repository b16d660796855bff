"""trainer.sharded on a one-process gloo group: which DTensor placements a sharded snapshot
accepts, and that a DTensor state digests like the same state of plain tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import HashStore
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from trainer import codec
from trainer.errors import UsageError
from trainer.sharded import _assemble, _live_chunk_digests, encode

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mesh() -> Iterator[Any]:
    dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _digest(obj: dict[str, Any]) -> str:
    enc = encode(obj, rank=0, world_size=1)
    arena = codec.StagingArena().stage(enc.encoded)
    view = arena.numpy().data if enc.encoded.arena_nbytes else memoryview(b"")
    totals = {c.key: c.total for c in enc.chunks}
    digest, _ = _assemble(enc.encoded.root, view, totals, {k: [d] for k, d in _live_chunk_digests(enc)})
    return digest


def _shared(model: dict[str, Any]) -> dict[str, Any]:
    return {"shared": {"model": model, "optimizer": {"state": {}, "param_groups": []},
                       "progress": {"step": 1, "epoch": 0, "best_metric": None}}}


def test_shard0_and_replicate_digest_like_plain_tensors(mesh: Any) -> None:
    w = torch.randn(9, 4)
    b = torch.randn(9)
    plain = _digest(_shared({"w": w, "b": b}))
    sharded = _digest(_shared({"w": distribute_tensor(w, mesh, [Shard(0)]),
                               "b": distribute_tensor(b, mesh, [Replicate()])}))
    assert sharded == plain


def test_other_placements_are_refused(mesh: Any) -> None:
    w = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    with pytest.raises(UsageError, match="Shard"):
        encode(_shared({"w": w}), rank=0, world_size=1)


def test_a_mesh_smaller_than_the_world_is_refused(mesh: Any) -> None:
    w = distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)])
    with pytest.raises(UsageError, match="1-D mesh"):
        encode(_shared({"w": w}), rank=0, world_size=2)
