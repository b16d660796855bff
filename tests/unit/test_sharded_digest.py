"""Sharded snapshots: the digest is independent of the sharding, the index round-trips, and
torch-free validation rejects a missing, truncated or altered shard file (storage.sharded)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from typing import Any

import numpy as np
import pytest
import torch

from storage import LocalSnapshotStore
from storage.blockhash import checksum_of
from storage.errors import CorruptSnapshot
from storage.layout import TENSORS_FILE, TREE_FILE
from storage.sharded import (
    BLOCK_BYTES,
    SHARD_INDEX_FILE,
    SHARDED_FORMAT,
    Chunk,
    ChunkHasher,
    IndexEntry,
    file_blocks_of,
    fill_from_file,
    hash_whole,
    index_bytes,
    parse_index,
    shard_file_name,
    tensor_digest,
)
from trainer import codec
from trainer.sharded import _assemble, _live_chunk_digests, encode

pytestmark = pytest.mark.timeout(60)


def _split_points(n: int, parts: int, rng: random.Random) -> list[int]:
    """``parts`` uneven (possibly empty) consecutive ranges of ``[0, n)``: their boundaries."""
    cuts = sorted(rng.randint(0, n) for _ in range(parts - 1))
    return [0, *cuts, n]


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_chunk_contributions_reassemble_to_the_whole_tensor_digest(block: int) -> None:
    rng = random.Random(block)
    for total in (0, 1, 63, 64, 65, 1000, 4096 * 3):
        data = bytes(rng.getrandbits(8) for _ in range(total))
        whole = hash_whole(data, block=block)
        for parts in (1, 2, 3, 5):
            bounds = _split_points(total, parts, rng)
            digests = []
            for lo, hi in itertools.pairwise(bounds):
                h = ChunkHasher(lo, hi - lo, total, block=block)
                pos = lo
                while pos < hi:  # fed in random pieces
                    step = rng.randint(1, max(1, hi - lo))
                    h.update(data[pos : min(hi, pos + step)])
                    pos = min(hi, pos + step)
                digests.append(h.finish())
            assert tensor_digest(total, digests, block=block) == whole


@pytest.mark.parametrize("congruent", [True, False])
def test_whole_blocks_taken_from_the_file_checksum_give_the_same_digest(congruent: bool) -> None:
    # A chunk placed at a file offset congruent to its tensor offset (the writer's layout for
    # large chunks) gets its whole grid blocks from the file's block hashes; elsewhere nothing
    # lines up and everything is hashed as before. Either way the digest is the same.
    rng = random.Random(int(congruent))
    total = 5 * BLOCK_BYTES + 777
    data = rng.randbytes(total)
    for lo, hi in [(0, total), (1000, 3 * BLOCK_BYTES + 5), (BLOCK_BYTES, 4 * BLOCK_BYTES),
                   (2 * BLOCK_BYTES + 9, total)]:
        offset = 3 * BLOCK_BYTES + (lo % BLOCK_BYTES if congruent else (lo + 100) % BLOCK_BYTES)
        file_bytes = rng.randbytes(offset) + data[lo:hi] + rng.randbytes(50)
        blocks = [hashlib.sha256(file_bytes[i : i + BLOCK_BYTES]).digest()
                  for i in range(0, len(file_bytes), BLOCK_BYTES)]
        reuse = file_blocks_of(lo, hi - lo, total, offset)
        whole_inside = [k for k in range(-(-lo // BLOCK_BYTES), hi // BLOCK_BYTES)
                        if (k + 1) * BLOCK_BYTES <= total]
        assert list(reuse.grid) == (whole_inside if congruent else [])
        h = ChunkHasher(lo, hi - lo, total, skip=reuse.grid)
        h.update(data[lo:hi])
        reused = h.finish()
        fill_from_file(reused, reuse, blocks)
        plain = ChunkHasher(lo, hi - lo, total)
        plain.update(data[lo:hi])
        assert reused == plain.finish()


def test_missing_or_overlapping_chunks_are_corrupt() -> None:
    data = bytes(range(200))
    a = ChunkHasher(0, 100, 200, block=64)
    a.update(data[:100])
    b = ChunkHasher(100, 100, 200, block=64)
    b.update(data[100:])
    da, db = a.finish(), b.finish()
    assert tensor_digest(200, [da, db], block=64) == hash_whole(data, block=64)
    with pytest.raises(CorruptSnapshot):
        tensor_digest(200, [da], block=64)
    with pytest.raises(CorruptSnapshot):
        tensor_digest(200, [da, da, db], block=64)


def test_edges_exactly_on_the_block_grid_send_no_pieces() -> None:
    data = os.urandom(4 * 64)
    h = ChunkHasher(64, 128, len(data), block=64)
    h.update(data[64:192])
    d = h.finish()
    assert sorted(d.blocks) == [1, 2] and not d.pieces
    inner = ChunkHasher(70, 10, len(data), block=64)
    inner.update(data[70:80])
    assert not inner.finish().blocks


def _state(rng: torch.Generator) -> dict[str, Any]:
    big = torch.randn(640, 1024, generator=rng)  # 2.5 MiB: rows of 4 KiB, blocks of 1 MiB
    model = {
        "emb.weight": big,
        "fc.weight": torch.randn(13, 5, generator=rng),
        "fc.bias": torch.randn(13, generator=rng),
        "tiny": torch.randn(1, generator=rng),
        "count": torch.tensor(3, dtype=torch.int64),
    }
    optim = {
        "state": {k: {"step": torch.tensor(4.0), "exp_avg": torch.randn(v.shape, generator=rng)}
                  for k, v in model.items() if v.dtype == torch.float32},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": sorted(model)}],
    }
    shared = {"model": model, "optimizer": optim, "scheduler": {"last_epoch": 4}, "scaler": None,
              "ema": None, "extras": {}, "progress": {"step": 4, "epoch": 0, "best_metric": None}}
    ranks = {r: {"step": 4, "rng": {"torch": torch.arange(7, dtype=torch.uint8) + r}, "loader": None}
             for r in range(3)}
    return {"shared": shared, "ranks": ranks, "world_size": 3}


def _write_sharded(store: LocalSnapshotStore, step: int, obj: dict[str, Any], splits: int,
                   seed: int) -> str:
    """Commit ``obj`` as a sharded snapshot split over ``splits`` files at random row
    boundaries (uneven, some empty); return the digest of the gathered state."""
    rng = random.Random(seed)
    enc = encode(obj, rank=0, world_size=1)
    arena = codec.StagingArena().stage(enc.encoded)
    arena_view = arena.numpy().data if enc.encoded.arena_nbytes else memoryview(b"")
    totals = {c.key: c.total for c in enc.chunks}
    gathered, components = _assemble(
        enc.encoded.root, arena_view, totals,
        {k: [d] for k, d in _live_chunk_digests(enc)},
    )
    images = [bytearray() for _ in range(splits)]
    entries = []
    for c in enc.chunks:
        full = c.source.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        rows = c.shape[0] if c.shape else 1
        row = len(full) // rows if rows else 0
        bounds = _split_points(rows, splits, rng)
        chunks = []
        for r, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            if hi == lo:
                continue
            image = images[r]
            image += b"\0" * (-len(image) % 64)
            offsets = (lo, *([0] * (len(c.shape) - 1))) if c.shape else ()
            sizes = (hi - lo, *c.shape[1:]) if c.shape else ()
            chunks.append(Chunk(file=shard_file_name(r), file_offset=len(image), start=lo * row,
                                nbytes=(hi - lo) * row, offsets=offsets, sizes=sizes))
            image += full[lo * row : hi * row]
        entries.append(IndexEntry(key=c.key, dtype=c.dtype, shape=c.shape, chunks=tuple(chunks)))
    rest, rank_components = codec.arena_digests(
        enc.encoded.canonical_tree_bytes(), arena_view, enc.encoded.slots,
        codec.component_plan(enc.encoded.root),
    )
    writer = store.begin(step)
    for r, image in enumerate(images):
        if any(ch.file == shard_file_name(r) for e in entries for ch in e.chunks):
            writer.write_bytes(shard_file_name(r), image)
    writer.write_bytes(TENSORS_FILE, arena_view)
    writer.write_bytes(TREE_FILE, enc.encoded.tree_bytes())
    writer.write_bytes(SHARD_INDEX_FILE, index_bytes(entries))
    writer.commit(
        run_id="t", epoch=0, world_size=3, digest=gathered,
        metadata={"sharded": {"format": SHARDED_FORMAT, "block_bytes": BLOCK_BYTES,
                              "rest_digest": rest, "copies": 1}},
        components={**rank_components, **components},
    )
    return gathered


@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_sharded_layout_validates_with_the_gathered_digest(tmp_path: Any, splits: int) -> None:
    obj = _state(torch.Generator().manual_seed(splits))
    store = LocalSnapshotStore(str(tmp_path))
    digest = _write_sharded(store, 4, obj, splits, seed=splits)
    info = store.validate(4)
    assert info.valid, info.reason
    assert info.manifest is not None and info.manifest.digest == digest
    # The same state split otherwise has the same digest.
    other = LocalSnapshotStore(str(tmp_path / "other"))
    assert _write_sharded(other, 4, obj, splits + 2, seed=99) == digest
    assert other.validate(4).valid


def test_digest_changes_with_one_bit_of_state(tmp_path: Any) -> None:
    obj = _state(torch.Generator().manual_seed(1))
    a = _write_sharded(LocalSnapshotStore(str(tmp_path / "a")), 4, obj, 2, seed=1)
    obj["shared"]["model"]["emb.weight"].view(torch.int32)[300, 7] ^= 1
    b = _write_sharded(LocalSnapshotStore(str(tmp_path / "b")), 4, obj, 2, seed=1)
    assert a != b


def test_index_round_trip_and_checks() -> None:
    entry = IndexEntry(key="$[shared][model][w]", dtype="float32", shape=(4, 3), chunks=(
        Chunk(file="shard-00000.bin", file_offset=0, start=0, nbytes=24, offsets=(0, 0), sizes=(2, 3)),
        Chunk(file="shard-00001.bin", file_offset=64, start=24, nbytes=24, offsets=(2, 0), sizes=(2, 3)),
    ))
    assert parse_index(index_bytes([entry])) == {entry.key: entry}
    doc = json.loads(index_bytes([entry]))
    doc["tensors"][0]["chunks"].pop()
    with pytest.raises(CorruptSnapshot, match="cover"):
        parse_index(json.dumps(doc).encode())
    doc = json.loads(index_bytes([entry]))
    doc["tensors"][0]["chunks"][1]["file"] = "../x"
    with pytest.raises(CorruptSnapshot):
        parse_index(json.dumps(doc).encode())
    doc = json.loads(index_bytes([entry]))
    doc["tensors"][0]["chunks"][1]["start"] = 20
    with pytest.raises(CorruptSnapshot, match="rows"):
        parse_index(json.dumps(doc).encode())


def _shard(tmp_path: Any) -> tuple[LocalSnapshotStore, str]:
    store = LocalSnapshotStore(str(tmp_path))
    _write_sharded(store, 4, _state(torch.Generator().manual_seed(0)), 3, seed=3)
    assert store.validate(4).valid
    path = os.path.join(store.path(4), shard_file_name(1))
    if not os.path.exists(path):
        path = os.path.join(store.path(4), shard_file_name(0))
    return store, path


def test_validation_rejects_a_missing_shard(tmp_path: Any) -> None:
    store, path = _shard(tmp_path)
    os.unlink(path)
    info = store.validate(4)
    assert not info.valid and "missing" in str(info.reason)


def test_validation_rejects_a_truncated_shard(tmp_path: Any) -> None:
    store, path = _shard(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)
    assert not store.validate(4).valid
    assert not store.validate(4, verify_checksums=False).valid


def test_validation_rejects_a_bit_flip(tmp_path: Any) -> None:
    store, path = _shard(tmp_path)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    info = store.validate(4)
    assert not info.valid and "checksum" in str(info.reason)


def test_validation_recomputes_the_digest_not_only_checksums(tmp_path: Any) -> None:
    """A shard altered together with its manifest checksum passes the checksums, not the digest."""
    store, path = _shard(tmp_path)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)
    manifest_path = os.path.join(store.path(4), "manifest.json")
    with open(manifest_path, "rb") as f:
        doc = json.loads(f.read())
    doc["files"][os.path.basename(path)]["checksum"] = checksum_of(data, doc["checksum_algorithm"])
    with open(manifest_path, "w") as f:
        json.dump(doc, f)
    info = store.validate(4)
    assert not info.valid and "digest" in str(info.reason)


def test_validation_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, storage.sharded, storage.local; "
            "assert 'torch' not in sys.modules, 'storage imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numpy_free_of_alignment_assumptions() -> None:
    # hash_whole over a numpy view equals over bytes (memoryview casts of other formats).
    a = np.arange(1000, dtype=np.float32)
    assert hash_whole(a.data.cast("B")) == hash_whole(a.tobytes())


def test_remote_tier_uploads_validates_and_restores_a_sharded_snapshot(tmp_path: Any) -> None:
    from storage.remote import RemoteSnapshotStore
    from storage.settings import StorageSettings

    store, _path = _shard(tmp_path / "local")
    remote = RemoteSnapshotStore((tmp_path / "mirror").as_uri(), settings=StorageSettings.from_env())
    remote.upload(store, 4)
    checked = remote.validate(4, verify_checksums=True)
    assert checked.valid, checked.reason
    restored = LocalSnapshotStore(str(tmp_path / "restored"))
    remote.download(4, restored)
    assert restored.validate(4).valid
    assert restored.read_manifest(4).digest == store.read_manifest(4).digest
    # A damaged shard object makes the remote snapshot invalid (its checksum, streamed).
    shard = next((tmp_path / "mirror").rglob("shard-0000*.bin"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x20
    shard.write_bytes(bytes(data))
    assert not remote.validate(4, verify_checksums=True).valid
    with pytest.raises(CorruptSnapshot):
        remote.download(4, LocalSnapshotStore(str(tmp_path / "again")))
