"""Remote tier logic on fsspec stores (memory://, file://): layout, upload, download, validation."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import (
    CorruptSnapshot,
    LocalSnapshotStore,
    Manifest,
    SnapshotConflict,
    SnapshotNotFound,
    StorageSettings,
    layout,
)
from storage.objectstore import FsspecObjectStore, ObjectStore, open_object_store
from storage.remote import RemoteSnapshotStore

DIGEST = "sha256:" + "1" * 64
SMALL = StorageSettings(read_chunk_bytes=1000, write_chunk_bytes=1000)

pytestmark = pytest.mark.timeout(60)


def payload(step: int, size: int = 5000) -> dict[str, bytes]:
    return {
        "tree.json": json.dumps({"step": step}).encode(),
        "tensors.bin": bytes((i * 7 + step) % 256 for i in range(size)),
    }


def commit(
    store: LocalSnapshotStore, step: int, digest: str = DIGEST, size: int = 5000
) -> Manifest:
    w = store.begin(step)
    for name, data in payload(step, size).items():
        w.write_bytes(name, data)
    return w.commit(run_id="run", epoch=0, world_size=1, digest=digest, metadata={"lr": 0.1})


@pytest.fixture(params=["memory", "file"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        u = f"memory://remote-test-{secrets.token_hex(6)}/prefix"
        yield u
        store = open_object_store(u)
        store.delete([k for k, _ in store.list("")])
    else:
        yield f"file://{tmp_path}/remote"


def remote_for(url: str) -> RemoteSnapshotStore:
    return RemoteSnapshotStore(url, settings=SMALL)


def test_open_object_store_picks_implementation(url: str) -> None:
    assert isinstance(open_object_store(url), FsspecObjectStore)
    assert isinstance(open_object_store(url), ObjectStore)
    with pytest.raises(ValueError):
        open_object_store("/no/scheme")


def test_round_trip_byte_identical(url: str, tmp_path: Path) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    m = commit(src, 10)
    remote = remote_for(url)
    seen: list[tuple[int, int]] = []
    res = remote.upload(src, 10, progress=lambda d, t: seen.append((d, t)))
    assert not res.skipped and res.bytes == m.total_bytes
    assert seen[-1] == (m.total_bytes, m.total_bytes)
    raw_remote = remote.store.get_bytes("snapshots/step-000000000010/manifest.json")
    assert raw_remote == Path(src.path(10), "manifest.json").read_bytes()

    infos = remote.list()
    assert [i.step for i in infos] == [10] and infos[0].tier == "remote" and infos[0].valid is None
    assert infos[0].digest == DIGEST and infos[0].path.endswith("snapshots/step-000000000010")
    assert remote.validate(10, verify_checksums=True).valid

    dst = LocalSnapshotStore(str(tmp_path / "dst"))
    progress: list[tuple[int, int]] = []
    info = remote.download(10, dst, progress=lambda d, t: progress.append((d, t)))
    assert info.valid and info.tier == "local" and info.step == 10
    assert progress[-1] == (m.total_bytes, m.total_bytes)
    for name in ("manifest.json", "tree.json", "tensors.bin"):
        assert Path(dst.path(10), name).read_bytes() == Path(src.path(10), name).read_bytes()
    assert dst.validate(10).valid
    assert dst.cleanup_abandoned() == []


def test_upload_is_idempotent_and_detects_conflicts(url: str, tmp_path: Path) -> None:
    a = LocalSnapshotStore(str(tmp_path / "a"))
    commit(a, 5)
    remote = remote_for(url)
    assert not remote.upload(a, 5).skipped
    assert remote.upload(a, 5).skipped
    b = LocalSnapshotStore(str(tmp_path / "b"))
    commit(b, 5, digest="sha256:" + "2" * 64)
    with pytest.raises(SnapshotConflict, match="different snapshot"):
        remote.upload(b, 5)


def test_manifest_put_if_absent(url: str) -> None:
    store = open_object_store(url)
    assert store.put_bytes("x/manifest.json", b"one", if_none_match=True)
    assert not store.put_bytes("x/manifest.json", b"two", if_none_match=True)
    assert store.get_bytes("x/manifest.json") == b"one"
    assert [k for k, _ in store.list("x/")] == ["x/manifest.json"]


def test_upload_refuses_rotted_local_bytes(url: str, tmp_path: Path) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 3)
    p = Path(src.path(3), "tensors.bin")
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    remote = remote_for(url)
    with pytest.raises(CorruptSnapshot, match="do not match"):
        remote.upload(src, 3)
    assert remote.list() == []
    # Truncated local file: refused too.
    p.write_bytes(bytes(data[:10]))
    with pytest.raises(CorruptSnapshot):
        remote.upload(src, 3)
    assert remote.list() == []


def test_manifest_less_and_junk_invisible(url: str, tmp_path: Path) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 1)
    commit(src, 2)
    remote = remote_for(url)
    remote.upload(src, 1)
    remote.upload(src, 2)
    store = remote.store
    # A torn upload of step 3 (data, no manifest) and junk keys.
    store.put_bytes("snapshots/step-000000000003/tensors.bin", b"partial")
    store.put_bytes("snapshots/step-3/manifest.json", b"{}")
    store.put_bytes("snapshots/garbage.txt", b"x")
    store.put_bytes("snapshots/step-000000000004/nested/manifest.json", b"{}")
    store.put_bytes("other/step-000000000009/manifest.json", b"{}")
    assert [i.step for i in remote.list()] == [1, 2]
    newest = remote.newest_valid(verify_checksums=True)
    assert newest is not None and newest.step == 2
    v = remote.validate(3)
    assert v.valid is False and "no remote snapshot" in (v.reason or "")


def test_corrupt_remote_data_skipped_and_download_refused(url: str, tmp_path: Path) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 1)
    commit(src, 2)
    remote = remote_for(url)
    remote.upload(src, 1)
    remote.upload(src, 2)
    key = "snapshots/step-000000000002/tensors.bin"
    data = bytearray(remote.store.get_bytes(key))
    data[0] ^= 1
    remote.store.put_bytes(key, bytes(data))  # same size, flipped bit
    assert remote.validate(2, verify_checksums=False).valid  # sizes still match
    bad = remote.validate(2, verify_checksums=True)
    assert bad.valid is False and "checksum" in (bad.reason or "")
    newest = remote.newest_valid(verify_checksums=True)
    assert newest is not None and newest.step == 1

    dst = LocalSnapshotStore(str(tmp_path / "dst"))
    commit(dst, 2, digest="sha256:" + "3" * 64)  # an existing local copy must survive
    before = Path(dst.path(2), "manifest.json").read_bytes()
    with pytest.raises(CorruptSnapshot, match="checksum"):
        remote.download(2, dst)
    assert Path(dst.path(2), "manifest.json").read_bytes() == before
    assert [e for e in os.listdir(dst.root) if e.startswith(".tmp")] == []


def test_size_mismatch_and_missing_object(url: str, tmp_path: Path) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 7)
    remote = remote_for(url)
    remote.upload(src, 7)
    remote.store.put_bytes("snapshots/step-000000000007/tensors.bin", b"short")
    [info] = remote.list()
    assert info.valid is False and "size" in (info.reason or "")
    assert remote.newest_valid() is None
    dst = LocalSnapshotStore(str(tmp_path / "dst"))
    with pytest.raises(CorruptSnapshot):
        remote.download(7, dst)
    assert dst.list() == []
    remote.store.delete(["snapshots/step-000000000007/tensors.bin"])
    assert remote.validate(7).reason == "tensors.bin: missing"
    with pytest.raises(CorruptSnapshot, match="missing"):
        remote.download(7, dst)
    assert dst.list() == []


def test_corrupt_and_wrong_step_manifest(url: str, tmp_path: Path) -> None:
    remote = remote_for(url)
    remote.store.put_bytes("snapshots/step-000000000004/manifest.json", b"{not json")
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 5)
    remote.upload(src, 5)
    raw = remote.store.get_bytes("snapshots/step-000000000005/manifest.json")
    remote.store.put_bytes("snapshots/step-000000000006/manifest.json", raw)  # says step 5
    infos = {i.step: i for i in remote.list()}
    assert infos[4].valid is False and infos[6].valid is False and infos[5].valid is None
    newest = remote.newest_valid()
    assert newest is not None and newest.step == 5
    with pytest.raises(SnapshotNotFound):
        remote.download(8, LocalSnapshotStore(str(tmp_path / "dst")))
    with pytest.raises(SnapshotConflict, match="unreadable"):
        commit(src, 4)
        remote.upload(src, 4)


def test_download_replaces_corrupt_local_copy(url: str, tmp_path: Path) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 9)
    remote = remote_for(url)
    remote.upload(src, 9)
    dst = LocalSnapshotStore(str(tmp_path / "dst"))
    commit(dst, 9)
    Path(dst.path(9), "tensors.bin").write_bytes(b"rotten")
    assert not dst.validate(9).valid
    remote.download(9, dst)
    assert dst.validate(9).valid
    assert dst.read_manifest(9) == src.read_manifest(9)


def test_delete_manifest_first(url: str, tmp_path: Path) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    commit(src, 1)
    commit(src, 2)
    remote = remote_for(url)
    remote.upload(src, 1)
    remote.upload(src, 2)
    order: list[str] = []
    real_delete = remote.store.delete

    def spy(keys: list[str]) -> None:
        order.extend(keys)
        real_delete(keys)

    remote.store.delete = spy  # type: ignore[method-assign]
    remote.delete(1)
    assert order[0].endswith("step-000000000001/manifest.json") and len(order) == 3
    assert [i.step for i in remote.list()] == [2]
    assert remote.store.list("snapshots/step-000000000001/") == []
    remote.delete(1)  # nothing there: fine


def test_state_round_trip(url: str) -> None:
    remote = remote_for(url)
    remote.put_state(1, {"phase": "running", "step": 3})
    remote.put_state(0, {"phase": "done", "step": 4})
    remote.put_state(0, {"phase": "done", "step": 5})
    remote.store.put_bytes("run/node-2/state.json", b"{broken")
    remote.store.put_bytes("run/node-x/state.json", b"{}")
    assert remote.get_state() == [{"phase": "done", "step": 5}, {"phase": "running", "step": 3}]


def test_preflight_and_abort_noop(url: str) -> None:
    remote = remote_for(url)
    remote.preflight()
    assert remote.abort_incomplete_uploads() == 0
    assert remote.store.list("") == []


def test_commit_manifest_rejects_mismatch(tmp_path: Path) -> None:
    src = LocalSnapshotStore(str(tmp_path / "src"))
    m = commit(src, 1)
    dst = LocalSnapshotStore(str(tmp_path / "dst"))
    files = payload(1)
    w = dst.begin(1)
    w.write_bytes("tree.json", files["tree.json"])
    w.write_bytes("tensors.bin", files["tensors.bin"][:-1] + b"\x00")
    with pytest.raises(CorruptSnapshot, match=r"tensors\.bin"):
        w.commit_manifest(m)
    assert dst.list() == [] and os.listdir(dst.root) == []
    w = dst.begin(1)
    w.write_bytes("tree.json", files["tree.json"])
    with pytest.raises(CorruptSnapshot, match="missing"):
        w.commit_manifest(m)
    w = dst.begin(2)
    with pytest.raises(CorruptSnapshot, match="step"):
        w.commit_manifest(m)
    w = dst.begin(1)
    for name, data in files.items():
        w.write_bytes(name, data)
    raw = Path(src.path(1), "manifest.json").read_bytes()
    w.commit_manifest(m, raw=raw)
    assert Path(dst.path(1), "manifest.json").read_bytes() == raw
    assert (
        hashlib.sha256(raw).hexdigest()
        == hashlib.sha256(Path(dst.path(1), layout.MANIFEST_NAME).read_bytes()).hexdigest()
    )
    assert dst.validate(1).valid


def test_invalid_keys_rejected(url: str) -> None:
    store = open_object_store(url)
    for bad in ("", "/abs", "a//b", "a/../b", "a/./b"):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"x")
