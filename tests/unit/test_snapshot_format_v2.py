"""Snapshot format 2: every byte hashed about once, the same guarantees, format 1 still read.

* the layout puts tensors of a MiB or more on 64 KiB block boundaries;
* the digest is made of tensor digests (sha256 of 64 KiB block hashes), written out here
  independently of ``storage``; streamed in any chunking, it is the live state's digest;
* the snapshot writer hashes each tensor byte about once (counted), where format 1 hashed it
  three times (file checksum, content digest, component digests);
* tampering in a whole block, in a tail or in padding is caught, also when the manifest's
  checksums are made to agree;
* a snapshot written by the previous version (format 1, ``fixtures/snapshot-v1``, written by
  commit fa84872) validates deeply, resumes, and training continues to the very state of a run
  that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch

from storage import LocalSnapshotStore, StorageSettings, content
from storage.blockhash import BLOCK_BYTES, BlockHasher
from storage.errors import CorruptSnapshot
from storage.remote import RemoteSnapshotStore
from tests.support import tamper
from tests.unit.test_trainer_checkpoint import Job
from trainer import codec
from trainer.checkpoint import Checkpointer
from trainer.settings import WorkerSettings
from trainer.state import TrainingState

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "snapshot-v1"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Any:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _reference_tensor_digest(data: bytes) -> bytes:
    blocks = b"".join(
        hashlib.sha256(data[i : i + BLOCK_BYTES]).digest() for i in range(0, len(data), BLOCK_BYTES)
    )
    return hashlib.sha256(blocks).digest()


def _big_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "w1": torch.randn(3 * (1 << 18) + 5, generator=g),  # 3 MiB + 20 bytes: a tail
        "bias": torch.randn(7, generator=g),  # small: 64-byte aligned, hashed on its own
        "w2": torch.randn(1 << 18, generator=g).to(torch.float64),  # 2 MiB, whole blocks only
        "mid": torch.randn(50_000, generator=g),  # 200 KB: under the alignment threshold
        "step": 3,
    }


def test_large_tensors_start_on_block_boundaries() -> None:
    encoded = codec.encode(_big_state())
    by_size = {s.nbytes: s.offset for s in encoded.slots}
    assert by_size[(3 * (1 << 18) + 5) * 4] % BLOCK_BYTES == 0
    assert by_size[(1 << 18) * 8] % BLOCK_BYTES == 0
    assert by_size[28] % 64 == 0 and by_size[200_000] % 64 == 0
    assert json.loads(encoded.tree_bytes())["format"] == "trainer-tree-v2"


def test_the_digest_is_made_of_tensor_digests() -> None:
    obj = _big_state()
    encoded = codec.encode(obj)
    expected = hashlib.sha256(
        content.canonical_json({"format": "trainer-tree-v2", "root": _strip(encoded.root)})
    )
    for src in encoded.sources:
        expected.update(_reference_tensor_digest(src.numpy().tobytes()))
    assert codec.state_digest(obj) == "sha256:" + expected.hexdigest()


def _strip(node: Any) -> Any:
    if isinstance(node, list):
        return [_strip(x) for x in node]
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in ("offset", "order")}
    return node


@pytest.mark.parametrize("seed", range(6))
def test_streamed_in_any_chunking_it_is_the_live_digest(seed: int) -> None:
    obj = _big_state()
    tree_json, arena, digest = codec.encode_to_bytes(obj)
    assert digest == codec.state_digest(obj)
    plan = content.plan_from_json(tree_json, len(arena))
    assert plan is not None
    rng = random.Random(seed)
    hasher, file_hasher = plan.hasher(), BlockHasher()
    view, pos = memoryview(arena), 0
    while pos < len(arena):
        n = rng.choice([1, 63, 4096, BLOCK_BYTES - 1, BLOCK_BYTES + 3, 1 << 20])
        hasher.update(view[pos : pos + n])
        file_hasher.update(view[pos : pos + n])
        pos += n
    assert hasher.finish(file_hasher) == digest == plan.digest_of(arena)


class _CountingHash:
    def __init__(self, counter: _Counting, real: Any) -> None:
        self._counter, self._real = counter, real

    def update(self, piece: bytes | memoryview) -> None:
        self._counter.bytes += memoryview(piece).nbytes
        self._real.update(piece)

    def digest(self) -> bytes:
        return bytes(self._real.digest())

    def hexdigest(self) -> str:
        return str(self._real.hexdigest())

    def copy(self) -> _CountingHash:
        return _CountingHash(self._counter, self._real.copy())


class _Counting:
    """Stands in for ``hashlib`` in the hashing modules: counts the bytes sha256 is fed."""

    def __init__(self) -> None:
        self.bytes = 0

    def sha256(self, data: bytes | memoryview = b"") -> _CountingHash:
        h = _CountingHash(self, hashlib.sha256())
        h.update(data)
        return h


def test_the_writer_hashes_every_byte_about_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting()
    fake = types.SimpleNamespace(sha256=counting.sha256)
    import storage.blockhash
    import storage.content

    for module in (storage.blockhash, storage.content, codec):
        monkeypatch.setattr(module, "hashlib", fake)
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: the bulk of the state
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    ckpt = Checkpointer(state, hparams={}, checkpoint_dir=str(tmp_path / "ck"), every=1,
                        staging="sync", settings=WorkerSettings.from_env({}))
    ckpt.step_done(1)
    ckpt.wait()
    snap = Path(ckpt.store.path(1))
    tensor_bytes = (snap / "tensors.bin").stat().st_size
    small = (snap / "tree.json").stat().st_size + (snap / "manifest.json").stat().st_size
    ckpt.close()
    monkeypatch.undo()
    # Format 1 fed about 3x the tensor bytes; now the file's blocks, the tails and small
    # tensors a second time (a few KB here), the JSON files and 32-byte digests.
    assert counting.bytes < 1.05 * tensor_bytes + 4 * small, (counting.bytes, tensor_bytes)
    assert LocalSnapshotStore(str(tmp_path / "ck")).validate(1, verify_checksums=True).valid


def _write(tmp_path: Path, obj: dict[str, Any]) -> tuple[LocalSnapshotStore, Path]:
    store = LocalSnapshotStore(str(tmp_path / "ck"))
    tree_json, arena, digest = codec.encode_to_bytes(obj)
    w = store.begin(1)
    w.write_bytes("tensors.bin", arena)
    w.write_bytes("tree.json", tree_json)
    w.commit(run_id="r", epoch=0, world_size=1, digest=digest)
    return store, Path(store.path(1))


@pytest.mark.parametrize("where", ["whole block", "tail", "small tensor"])
def test_tampering_is_caught_even_with_matching_checksums(tmp_path: Path, where: str) -> None:
    store, snap = _write(tmp_path, _big_state())
    assert store.validate(1, verify_checksums=True).valid
    tree = json.loads((snap / "tree.json").read_text())
    records = {r["nbytes"]: r for r in content.tensor_records(tree["root"])}
    w1 = records[(3 * (1 << 18) + 5) * 4]
    at = {
        "whole block": w1["offset"] + BLOCK_BYTES + 11,
        "tail": w1["offset"] + w1["nbytes"] - 3,
        "small tensor": records[28]["offset"] + 5,
    }[where]
    data = bytearray((snap / "tensors.bin").read_bytes())
    data[at] ^= 0x40
    (snap / "tensors.bin").write_bytes(bytes(data))
    tamper.rewrite_manifest_entry(snap, "tensors.bin")  # the checksums agree again
    files_only = LocalSnapshotStore(store.checkpoint_dir, verify_content=False)
    assert files_only.validate(1, verify_checksums=True).valid
    info = store.validate(1, verify_checksums=True)
    assert not info.valid and "content digest" in str(info.reason)


def test_padding_is_covered_by_the_file_checksum(tmp_path: Path) -> None:
    store, snap = _write(tmp_path, _big_state())
    tree = json.loads((snap / "tree.json").read_text())
    first = min(r["offset"] + r["nbytes"] for r in content.tensor_records(tree["root"]))
    data = bytearray((snap / "tensors.bin").read_bytes())
    data[first] ^= 0x01  # a padding byte after the first tensor
    (snap / "tensors.bin").write_bytes(bytes(data))
    info = store.validate(1, verify_checksums=True)
    assert not info.valid and "checksum" in str(info.reason)


def test_a_format_2_tree_under_plain_sha256_checksums_is_refused() -> None:
    tree_json, arena, _digest = codec.encode_to_bytes(_big_state())
    plan = content.plan_from_json(tree_json, len(arena))
    assert plan is not None
    hasher, plain = plan.hasher(), hashlib.sha256()
    hasher.update(memoryview(arena))
    plain.update(arena)
    with pytest.raises(CorruptSnapshot, match="not by blocks"):
        hasher.finish(plain)


# -- format 1 still read ----------------------------------------------------------------------


def _v1_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ck"
    shutil.copytree(FIXTURE_V1, directory)
    return directory


def test_a_format_1_snapshot_validates_deeply(tmp_path: Path) -> None:
    directory = _v1_dir(tmp_path)
    store = LocalSnapshotStore(str(directory))
    manifest = store.read_manifest(10)
    assert (manifest.format_version, manifest.checksum_algorithm) == (1, "sha256")
    info = store.validate(10, verify_checksums=True)
    assert info.valid, info.reason
    snap = Path(store.path(10))
    digest, components = codec.snapshot_digests(
        (snap / "tree.json").read_bytes(), (snap / "tensors.bin").read_bytes()
    )
    assert (digest, components) == (manifest.digest, dict(manifest.components))


def test_a_tampered_format_1_snapshot_is_still_caught(tmp_path: Path) -> None:
    directory = _v1_dir(tmp_path)
    store = LocalSnapshotStore(str(directory))
    snap = Path(store.path(10))
    tamper.retype_tensor(snap)  # tree changed, its checksum fixed, digest left alone
    files_only = LocalSnapshotStore(store.checkpoint_dir, verify_content=False)
    assert files_only.validate(10, verify_checksums=True).valid
    info = store.validate(10, verify_checksums=True)
    assert not info.valid and "content digest" in str(info.reason)


def test_a_format_1_snapshot_resumes_and_training_continues_bit_exactly(tmp_path: Path) -> None:
    straight = Job(tmp_path / "straight")
    straight.train(20, finish=False)
    expected = straight.digest()
    straight.ckpt.close()

    resumed = Job(_v1_dir(tmp_path))
    resumed.train(20, finish=False)
    assert resumed.digest() == expected
    # The snapshots written after the resume are format 2, beside the format-1 one.
    store = resumed.ckpt.store
    assert store.read_manifest(10).format_version == 1
    assert store.read_manifest(20).format_version == 2
    assert store.read_manifest(20).digest == expected
    resumed.ckpt.close()


def _remote(tmp_path: Path) -> RemoteSnapshotStore:
    return RemoteSnapshotStore((tmp_path / "mirror").as_uri(), settings=StorageSettings.from_env())


def test_a_format_1_snapshot_round_trips_through_the_remote_tier(tmp_path: Path) -> None:
    local = LocalSnapshotStore(str(_v1_dir(tmp_path)))
    remote = _remote(tmp_path)
    assert not remote.upload(local, 10).skipped
    assert remote.validate(10, verify_checksums=True).valid
    fresh = LocalSnapshotStore(str(tmp_path / "fresh"))
    info = remote.download(10, fresh)
    assert info.valid and fresh.read_manifest(10).format_version == 1
    # Byte for byte what was uploaded, and still valid (its own checksum algorithm).
    for name in ("tree.json", "tensors.bin", "manifest.json"):
        assert (Path(fresh.path(10)) / name).read_bytes() == (Path(local.path(10)) / name).read_bytes()
    assert fresh.validate(10, verify_checksums=True).valid


def test_the_same_step_in_another_format_is_kept_remotely_not_a_conflict(tmp_path: Path) -> None:
    # Saved by the previous release and mirrored, then replayed after an upgrade: the new
    # format-2 save of the step finds the format-1 copy of the same run there.
    local = LocalSnapshotStore(str(_v1_dir(tmp_path)))
    remote = _remote(tmp_path)
    remote.upload(local, 10)
    run_id = local.read_manifest(10).run_id
    other = LocalSnapshotStore(str(tmp_path / "other"))
    tree_json, arena, digest = codec.encode_to_bytes({"w": torch.ones(3)})
    w = other.begin(10)
    w.write_bytes("tensors.bin", arena)
    w.write_bytes("tree.json", tree_json)
    w.commit(run_id=run_id, epoch=0, world_size=1, digest=digest)
    assert remote.upload(other, 10).skipped
    assert remote.read_manifest(10).format_version == 1


def test_a_newer_release_snapshot_at_the_same_step_is_kept_aside(tmp_path: Path) -> None:
    store, snap = _write(tmp_path, _big_state())
    doc = json.loads((snap / "manifest.json").read_text())
    doc["format_version"] = 3
    (snap / "manifest.json").write_text(json.dumps(doc))
    (snap / "marker").write_text("the newer release's")
    tree_json, arena, digest = codec.encode_to_bytes({"w": torch.ones(3)})
    w = store.begin(1)
    w.write_bytes("tensors.bin", arena)
    w.write_bytes("tree.json", tree_json)
    w.commit(run_id="r", epoch=0, world_size=1, digest=digest)
    assert store.read_manifest(1).format_version == 2
    kept = list(Path(store.checkpoint_dir, "snapshots").glob("step-000000000001.newer-format-*"))
    assert len(kept) == 1 and (kept[0] / "marker").read_text() == "the newer release's"
    assert [i.step for i in store.list()] == [1]  # the kept one is not listed as a snapshot
