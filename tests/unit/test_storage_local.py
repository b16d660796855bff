"""Local tier: atomic commit, validation, newest-valid selection, verified reads, cleanup."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from storage import (
    CorruptSnapshot,
    FileEntry,
    LocalSnapshotStore,
    Manifest,
    SnapshotNotFound,
    StorageError,
    StorageSettings,
    layout,
)

DIGEST = "sha256:" + "0" * 64
REPO = Path(__file__).resolve().parents[2]


def payload(step: int) -> dict[str, bytes]:
    tensors = bytes((i * 7 + step) % 256 for i in range(4096))
    return {"tree.json": json.dumps({"step": step}).encode(), "tensors.bin": tensors}


def commit(
    store: LocalSnapshotStore,
    step: int,
    files: Mapping[str, bytes] | None = None,
    *,
    on_phase: Callable[[str], None] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Manifest:
    w = store.begin(step, on_phase=on_phase)
    try:
        for name, data in (files or payload(step)).items():
            w.write_bytes(name, data)
        return w.commit(
            run_id="run", epoch=step // 10, world_size=2, digest=DIGEST, metadata=metadata
        )
    except BaseException:
        w.abort()
        raise


def entries(store: LocalSnapshotStore) -> set[str]:
    return set(os.listdir(store.root))


def temp_entries(store: LocalSnapshotStore) -> set[str]:
    return {e for e in entries(store) if e.startswith(".tmp-")}


def flip_bit(path: str, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.fixture
def store(tmp_path: Path) -> LocalSnapshotStore:
    return LocalSnapshotStore(str(tmp_path / "ckpt"))


# -- commit ----------------------------------------------------------------------------------


def test_begin_creates_snapshots_dir(tmp_path: Path) -> None:
    s = LocalSnapshotStore(str(tmp_path / "a" / "b"))
    assert os.path.isdir(tmp_path / "a" / "b" / "snapshots")
    assert s.list() == []
    assert s.newest_valid() is None
    assert s.newest_valid(cleanup=True, verify_checksums=False) is None


def test_commit_writes_files_and_manifest(store: LocalSnapshotStore) -> None:
    phases: list[str] = []
    m = commit(store, 25, on_phase=phases.append, metadata={"lr": 0.5, "metrics": {"loss": 2.0}})
    assert phases == ["after_files", "before_rename"]
    assert entries(store) == {"step-000000000025"}
    assert store.path(25) == os.path.join(store.root, "step-000000000025")
    assert sorted(os.listdir(store.path(25))) == ["manifest.json", "tensors.bin", "tree.json"]
    assert m.step == 25 and m.epoch == 2 and m.world_size == 2 and m.run_id == "run"
    assert m.metadata["lr"] == 0.5
    assert m.total_bytes == sum(len(v) for v in payload(25).values())
    assert store.read_manifest(25) == m
    info = store.validate(25)
    assert info.valid is True and info.reason is None and info.manifest == m
    [listed] = store.list()
    assert listed.step == 25 and listed.valid is None and listed.manifest == m
    rec = listed.to_json()
    assert rec["tier"] == "local" and rec["bytes"] == m.total_bytes and rec["digest"] == DIGEST
    assert rec["metrics"] == {"loss": 2.0}


def test_commit_order_files_fsynced_manifest_last_then_rename_then_parent(
    store: LocalSnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import storage.writer as writer_mod

    log: list[tuple[str, str]] = []
    real_fsync, real_fsync_dir, real_rename = os.fsync, writer_mod.fsync_dir, os.rename

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not os.path.isdir(target):  # directories are recorded by fsync_dir
            log.append(("fsync", os.path.basename(target)))
        real_fsync(fd)

    def fsync_dir(path: str) -> None:
        log.append(("fsync_dir", os.path.basename(path)))
        real_fsync_dir(path)

    def rename(a: str, b: str) -> None:
        log.append(("rename", os.path.basename(b)))
        real_rename(a, b)

    def hook(phase: str) -> None:
        [tmp] = temp_entries(store)
        present = sorted(os.listdir(os.path.join(store.root, tmp)))
        log.append((phase, ",".join(present)))
        if phase == "before_rename":
            Manifest.from_json(Path(store.root, tmp, "manifest.json").read_bytes())

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(writer_mod, "fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "rename", rename)
    commit(store, 8, on_phase=hook)
    assert log[0:2] == [("fsync", "tree.json"), ("fsync", "tensors.bin")]
    assert log[2] == ("after_files", "tensors.bin,tree.json")  # no manifest yet
    assert log[3] == ("fsync", "manifest.json")
    assert log[4][0] == "fsync_dir" and log[4][1].startswith(".tmp-step-000000000008-")
    assert log[5] == ("before_rename", "manifest.json,tensors.bin,tree.json")
    assert log[6:] == [("rename", "step-000000000008"), ("fsync_dir", "snapshots")]


def test_streaming_write_in_small_chunks(tmp_path: Path) -> None:
    s = LocalSnapshotStore(
        str(tmp_path), settings=StorageSettings(write_chunk_bytes=7, read_chunk_bytes=5)
    )
    data = bytes(range(256)) * 13
    w = s.begin(3)
    with w.open("tensors.bin") as f:
        f.write(memoryview(data)[:1000])
        f.write(bytearray(data[1000:2000]))
        f.write(data[2000:])
    w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    assert s.validate(3).valid
    assert s.open_verified(3, "tensors.bin") == data
    buf = bytearray(len(data))
    s.read_into(3, "tensors.bin", memoryview(buf))
    assert buf == data


def test_writer_rejects_bad_names_and_duplicates(store: LocalSnapshotStore) -> None:
    w = store.begin(1)
    try:
        for bad in ["../x", "a/b", "manifest.json", ".hidden", ""]:
            with pytest.raises(ValueError):
                w.open(bad)
        w.write_bytes("a", b"1")
        with pytest.raises(ValueError):
            w.write_bytes("a", b"2")
    finally:
        w.abort()
    assert entries(store) == set()
    with pytest.raises(ValueError):
        store.begin(-1)


def test_abort_removes_temp_and_keeps_older(store: LocalSnapshotStore) -> None:
    commit(store, 1)
    w = store.begin(2)
    w.write_bytes("tensors.bin", b"x" * 100)
    assert os.path.isdir(w.tmp_path)
    assert len(temp_entries(store)) == 1
    assert [i.step for i in store.list()] == [1]  # in-flight snapshots are never listed
    w.abort()
    w.abort()  # idempotent
    assert not os.path.exists(w.tmp_path)
    assert entries(store) == {"step-000000000001"}
    assert store.validate(1).valid
    with pytest.raises(StorageError):
        w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    with pytest.raises(StorageError):
        w.open("x")


def test_commit_twice_rejected(store: LocalSnapshotStore) -> None:
    w = store.begin(1)
    w.write_bytes("a", b"1")
    w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    with pytest.raises(StorageError):
        w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    w.abort()  # after commit: a no-op, the committed snapshot stays
    assert store.validate(1).valid


class Crash(Exception):
    pass


@pytest.mark.parametrize("phase", ["after_files", "before_rename"])
def test_exception_at_phase_leaves_no_snapshot(store: LocalSnapshotStore, phase: str) -> None:
    commit(store, 10)
    commit(store, 20)
    seen: list[str] = []

    def hook(p: str) -> None:
        seen.append(p)
        if p == phase:
            raise Crash(p)

    with pytest.raises(Crash):
        commit(store, 30, on_phase=hook)
    assert seen[-1] == phase
    assert entries(store) == {"step-000000000010", "step-000000000020"}  # temp dir removed
    assert not os.path.exists(store.path(30))
    newest = store.newest_valid()
    assert newest is not None and newest.step == 20
    assert store.validate(10).valid


def test_invalid_commit_arguments_leave_nothing(store: LocalSnapshotStore) -> None:
    w = store.begin(5)
    w.write_bytes("a", b"1")
    with pytest.raises(ValueError):
        w.commit(run_id="r", epoch=0, world_size=1, digest="md5:xyz")
    assert entries(store) == set()
    w = store.begin(5)
    with pytest.raises(ValueError):  # no files at all
        w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    assert entries(store) == set()


_CRASH_CHILD = textwrap.dedent(
    """
    import os, sys
    from storage import LocalSnapshotStore
    store = LocalSnapshotStore(sys.argv[1])
    phase = sys.argv[2]
    def hook(p):
        if p == phase:
            os._exit(9)   # the process dies here: no abort, no cleanup
    w = store.begin(30, on_phase=hook)
    w.write_bytes("tensors.bin", b"x" * 1000)
    w.commit(run_id="r", epoch=0, world_size=1, digest="sha256:" + "0" * 64)
    """
)


@pytest.mark.parametrize("phase", ["after_files", "before_rename"])
def test_hard_crash_at_phase_leaves_only_garbage(tmp_path: Path, phase: str) -> None:
    store = LocalSnapshotStore(str(tmp_path))
    commit(store, 20)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rc = subprocess.run(
        [sys.executable, "-c", _CRASH_CHILD, str(tmp_path), phase], env=env, timeout=60
    ).returncode
    assert rc == 9
    assert not os.path.exists(store.path(30))
    [tmp] = temp_entries(store)
    assert layout.parse_temp(tmp) == 30
    if phase == "before_rename":  # the manifest was complete, just never renamed into place
        assert os.path.exists(os.path.join(store.root, tmp, "manifest.json"))
    assert [i.step for i in store.list()] == [20]
    newest = store.newest_valid(cleanup=True)
    assert newest is not None and newest.step == 20
    assert temp_entries(store) == {tmp}  # selection does not touch temp dirs
    assert store.cleanup_abandoned() == [os.path.join(store.root, tmp)]
    assert entries(store) == {"step-000000000020"}
    assert store.validate(20).valid


@pytest.mark.parametrize("damage", ["no_manifest", "bitflip", "garbage_manifest", "file"])
def test_commit_replaces_invalid_committed_dir(store: LocalSnapshotStore, damage: str) -> None:
    commit(store, 5, {"tensors.bin": b"old" * 100})
    p = store.path(5)
    if damage == "no_manifest":
        os.remove(os.path.join(p, "manifest.json"))
    elif damage == "bitflip":
        flip_bit(os.path.join(p, "tensors.bin"), 10)
    elif damage == "garbage_manifest":
        Path(p, "manifest.json").write_bytes(b"{garbage")
    else:
        Path(p, "stray").write_text("left over")
    new = payload(5)
    commit(store, 5, new)
    info = store.validate(5)
    assert info.valid, info.reason
    assert sorted(os.listdir(p)) == ["manifest.json", "tensors.bin", "tree.json"]
    assert store.open_verified(5, "tensors.bin") == new["tensors.bin"]
    assert entries(store) == {"step-000000000005"}  # the displaced dir is gone as well


@pytest.mark.parametrize("squatter", ["file", "symlink"])
def test_commit_over_junk_squatting_on_the_name(
    store: LocalSnapshotStore, tmp_path: Path, squatter: str
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("keep")
    name = Path(store.path(4))
    if squatter == "file":
        name.write_text("junk")
    else:
        name.symlink_to(target)
    commit(store, 4)
    assert store.validate(4).valid
    assert entries(store) == {"step-000000000004"}
    assert (target / "precious").read_text() == "keep"  # a symlink's target is never touched


# -- validation ------------------------------------------------------------------------------


def test_bit_flip_needs_checksums(store: LocalSnapshotStore) -> None:
    commit(store, 7)
    flip_bit(os.path.join(store.path(7), "tensors.bin"))
    info = store.validate(7, verify_checksums=True)
    assert info.valid is False
    assert info.reason is not None and "checksum mismatch" in info.reason
    assert "tensors.bin" in info.reason
    assert info.manifest is not None  # the manifest itself was fine
    assert store.validate(7, verify_checksums=False).valid is True  # sizes still match


@pytest.mark.parametrize("damaged", ["tensors.bin", "tree.json"])
def test_truncated_file_invalid(store: LocalSnapshotStore, damaged: str) -> None:
    commit(store, 7)
    path = os.path.join(store.path(7), damaged)
    os.truncate(path, os.path.getsize(path) - 1)
    for verify in (True, False):
        info = store.validate(7, verify_checksums=verify)
        assert info.valid is False and info.reason is not None and "size" in info.reason


def test_grown_file_invalid(store: LocalSnapshotStore) -> None:
    commit(store, 7)
    with open(os.path.join(store.path(7), "tensors.bin"), "ab") as f:
        f.write(b"\0")
    assert store.validate(7, verify_checksums=False).valid is False


def test_missing_file_invalid(store: LocalSnapshotStore) -> None:
    commit(store, 7)
    os.remove(os.path.join(store.path(7), "tree.json"))
    info = store.validate(7, verify_checksums=False)
    assert info.valid is False and info.reason is not None and "missing" in info.reason
    assert "tree.json" in info.reason


def test_missing_manifest_invalid(store: LocalSnapshotStore) -> None:
    commit(store, 7)
    os.remove(os.path.join(store.path(7), "manifest.json"))
    info = store.validate(7)
    assert info.valid is False and info.reason is not None and "manifest" in info.reason
    [listed] = store.list()
    assert listed.valid is False and listed.manifest is None
    with pytest.raises(CorruptSnapshot):
        store.read_manifest(7)


def test_manifest_is_a_directory(store: LocalSnapshotStore) -> None:
    commit(store, 7)
    os.remove(os.path.join(store.path(7), "manifest.json"))
    os.mkdir(os.path.join(store.path(7), "manifest.json"))
    assert store.validate(7).valid is False
    assert store.list()[0].valid is False
    assert store.newest_valid() is None


def test_manifest_step_must_match_directory(store: LocalSnapshotStore) -> None:
    commit(store, 5)
    os.rename(store.path(5), store.path(6))
    info = store.validate(6)
    assert info.valid is False and info.reason is not None and "step 5" in info.reason
    assert store.list()[0].valid is False
    assert store.newest_valid() is None


def test_extra_file_does_not_invalidate(store: LocalSnapshotStore) -> None:
    commit(store, 5)
    Path(store.path(5), "junk.txt").write_text("operator notes")
    os.mkdir(os.path.join(store.path(5), "subdir"))
    assert store.validate(5).valid


def test_validate_unknown_step(store: LocalSnapshotStore) -> None:
    info = store.validate(99)
    assert info.valid is False and info.reason
    with pytest.raises(SnapshotNotFound):
        store.read_manifest(99)


def _write_manifest(store: LocalSnapshotStore, step: int, files: dict[str, FileEntry]) -> None:
    os.makedirs(store.path(step), exist_ok=True)
    m = Manifest(
        run_id="r", step=step, epoch=0, world_size=1, files=files, digest=DIGEST, created_at=1.0
    )
    Path(store.path(step), "manifest.json").write_bytes(m.to_json())


def test_manifest_naming_odd_paths_is_invalid_not_a_crash(store: LocalSnapshotStore) -> None:
    """A listed file that is a directory or an impossible name makes the snapshot invalid."""
    commit(store, 1)
    os.mkdir(os.path.join(store.root, "elsewhere"))
    _write_manifest(store, 2, {"d": FileEntry(size=0, checksum="0" * 64)})
    os.mkdir(os.path.join(store.path(2), "d"))
    _write_manifest(store, 3, {"x" * 300: FileEntry(size=0, checksum="0" * 64)})
    for step in (2, 3):
        for verify in (True, False):
            info = store.validate(step, verify_checksums=verify)
            assert info.valid is False, (step, verify)
    newest = store.newest_valid()
    assert newest is not None and newest.step == 1


def test_symlinked_data_file_is_still_checked(store: LocalSnapshotStore, tmp_path: Path) -> None:
    commit(store, 1)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * len(payload(1)["tensors.bin"]))
    p = os.path.join(store.path(1), "tensors.bin")
    os.remove(p)
    os.symlink(outside, p)
    assert store.validate(1).valid is False


# -- newest_valid ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "no_manifest", "bad_manifest"])
def test_newest_valid_falls_back(store: LocalSnapshotStore, damage: str) -> None:
    for s in (10, 20, 30):
        commit(store, s)
    p = store.path(30)
    if damage == "bitflip":
        flip_bit(os.path.join(p, "tensors.bin"))
    elif damage == "truncate":
        os.truncate(os.path.join(p, "tensors.bin"), 10)
    elif damage == "no_manifest":
        os.remove(os.path.join(p, "manifest.json"))
    else:
        Path(p, "manifest.json").write_bytes(b'{"step": 30')
    newest = store.newest_valid()
    assert newest is not None and newest.step == 20 and newest.valid is True
    assert os.path.exists(p)  # not deleted without cleanup
    if damage == "bitflip":
        fast = store.newest_valid(verify_checksums=False)
        assert fast is not None and fast.step == 30
    newest = store.newest_valid(cleanup=True)
    assert newest is not None and newest.step == 20
    assert not os.path.exists(p)
    assert [i.step for i in store.list()] == [10, 20]
    assert temp_entries(store) == set()


def test_newest_valid_cleanup_deletes_only_invalid(store: LocalSnapshotStore) -> None:
    for s in (1, 2, 3, 4, 5):
        commit(store, s)
    os.remove(os.path.join(store.path(5), "manifest.json"))
    flip_bit(os.path.join(store.path(4), "tensors.bin"))
    os.remove(os.path.join(store.path(2), "tree.json"))  # older than the newest valid
    newest = store.newest_valid(cleanup=True)
    assert newest is not None and newest.step == 3
    # 4 and 5 were examined and removed; 2 was never examined (selection stopped at 3).
    assert [i.step for i in store.list()] == [1, 2, 3]
    assert store.validate(1).valid and store.validate(3).valid


def test_newest_valid_max_step(store: LocalSnapshotStore) -> None:
    for s in (10, 20, 30):
        commit(store, s)
    os.remove(os.path.join(store.path(30), "manifest.json"))
    for max_step, expect in [(30, 20), (29, 20), (20, 20), (19, 10), (10, 10), (9, None)]:
        got = store.newest_valid(max_step=max_step)
        assert (got.step if got else None) == expect, max_step
    flip_bit(os.path.join(store.path(20), "tensors.bin"))
    got = store.newest_valid(max_step=25, cleanup=True)
    assert got is not None and got.step == 10
    assert [i.step for i in store.list()] == [10, 30]  # 30 is above max_step: left alone


# -- reads -----------------------------------------------------------------------------------


def test_open_verified_and_read_into(store: LocalSnapshotStore) -> None:
    files = payload(3)
    commit(store, 3, files)
    for name, data in files.items():
        assert store.open_verified(3, name) == data
        buf = bytearray(len(data))
        m = store.read_into(3, name, buf)
        assert bytes(buf) == data and m.step == 3
        view_buf = bytearray(len(data) + 10)
        store.read_into(3, name, memoryview(view_buf)[5 : 5 + len(data)])
        assert bytes(view_buf[5 : 5 + len(data)]) == data


def test_empty_file(store: LocalSnapshotStore) -> None:
    commit(store, 3, {"empty": b"", "tensors.bin": b"x"})
    assert store.validate(3).valid
    assert store.open_verified(3, "empty") == b""
    store.read_into(3, "empty", bytearray(0))
    with open(os.path.join(store.path(3), "empty"), "ab") as f:
        f.write(b"!")
    with pytest.raises(CorruptSnapshot):
        store.read_into(3, "empty", bytearray(0))
    with pytest.raises(CorruptSnapshot):
        store.open_verified(3, "empty")


def test_reads_detect_bit_flip(store: LocalSnapshotStore) -> None:
    commit(store, 3)
    flip_bit(os.path.join(store.path(3), "tensors.bin"), 4000)
    with pytest.raises(CorruptSnapshot, match="checksum"):
        store.open_verified(3, "tensors.bin")
    with pytest.raises(CorruptSnapshot, match="checksum"):
        store.read_into(3, "tensors.bin", bytearray(4096))


def test_reads_detect_grown_and_truncated_file(store: LocalSnapshotStore) -> None:
    commit(store, 3)
    p = os.path.join(store.path(3), "tensors.bin")
    with open(p, "ab") as f:
        f.write(b"extra")  # the first 4096 bytes are still exactly right
    with pytest.raises(CorruptSnapshot):
        store.read_into(3, "tensors.bin", bytearray(4096))
    with pytest.raises(CorruptSnapshot):
        store.open_verified(3, "tensors.bin")
    os.truncate(p, 4000)
    with pytest.raises(CorruptSnapshot):
        store.read_into(3, "tensors.bin", bytearray(4096))
    with pytest.raises(CorruptSnapshot):
        store.open_verified(3, "tensors.bin")
    os.remove(p)
    with pytest.raises(CorruptSnapshot):
        store.open_verified(3, "tensors.bin")


def test_map_verifying_reads_the_file_and_checks_it(store: LocalSnapshotStore) -> None:
    files = payload(3)
    commit(store, 3, files)
    for name, data in files.items():
        with store.map_verifying(3, name) as mapped:
            assert mapped.array.tobytes() == data
            assert mapped.array.flags.writeable  # copy-on-write: torch may view it
            mapped.array[:1] = 0  # never reaches the file
            mapped.verified()
        assert store.open_verified(3, name) == data


def test_writes_into_the_mapping_never_reach_the_checksum(
    store: LocalSnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller may write into its copy-on-write views before the hash has read those pages
    (it ran beside the decoder on the same mapping once, failing a good file at random)."""
    from storage import reading

    files = payload(3)
    commit(store, 3, files)
    written = threading.Event()
    hash_file = reading.MappedFile._hash

    def after_the_write(self: reading.MappedFile) -> str:
        written.wait(10)
        return hash_file(self)

    monkeypatch.setattr(reading.MappedFile, "_hash", after_the_write)
    for name in files:
        with store.map_verifying(3, name) as mapped:
            mapped.array[:] = 0xFF
            written.set()
            mapped.verified()  # the file is intact
        written.clear()


def test_map_verifying_detects_damage(store: LocalSnapshotStore) -> None:
    commit(store, 3)
    p = os.path.join(store.path(3), "tensors.bin")
    flip_bit(p, 4000)
    with store.map_verifying(3, "tensors.bin") as mapped:
        assert len(mapped.array) == 4096  # the caller may decode meanwhile...
        with pytest.raises(CorruptSnapshot, match="checksum"):
            mapped.verified()  # ...but learns before using anything
    with open(p, "ab") as f:
        f.write(b"extra")
    with pytest.raises(CorruptSnapshot, match="size"):
        store.map_verifying(3, "tensors.bin")
    os.truncate(p, 4000)
    with pytest.raises(CorruptSnapshot, match="size"):
        store.map_verifying(3, "tensors.bin")
    os.remove(p)
    with pytest.raises(CorruptSnapshot, match="missing"):
        store.map_verifying(3, "tensors.bin")
    with pytest.raises(CorruptSnapshot):
        store.map_verifying(3, "nope.bin")


def test_map_verifying_empty_file(store: LocalSnapshotStore) -> None:
    commit(store, 3, {"empty": b"", "tensors.bin": b"x"})
    with store.map_verifying(3, "empty") as mapped:
        assert mapped.array.size == 0
        mapped.verified()


def test_read_into_wrong_buffer_size(store: LocalSnapshotStore) -> None:
    commit(store, 3)
    for n in (0, 4095, 4097):
        with pytest.raises(ValueError):
            store.read_into(3, "tensors.bin", bytearray(n))


def test_reads_of_unknown_file_or_step(store: LocalSnapshotStore) -> None:
    commit(store, 3)
    with pytest.raises(CorruptSnapshot):
        store.open_verified(3, "nope.bin")
    with pytest.raises(CorruptSnapshot):
        store.read_into(3, "nope.bin", bytearray(1))
    with pytest.raises(SnapshotNotFound):
        store.open_verified(4, "tensors.bin")
    with pytest.raises(SnapshotNotFound):
        store.read_into(4, "tensors.bin", bytearray(4096))


# -- deletion and cleanup --------------------------------------------------------------------


def test_delete(store: LocalSnapshotStore) -> None:
    commit(store, 1)
    commit(store, 2)
    store.delete(1)
    store.delete(1)  # already gone: no error
    store.delete(77)
    assert entries(store) == {"step-000000000002"}


def test_cleanup_abandoned_removes_only_temp_dirs(store: LocalSnapshotStore) -> None:
    commit(store, 1)
    w = store.begin(2)
    w.write_bytes("a", b"1")  # an abandoned writer (its process died)
    root = Path(store.root)
    keep_dirs = [".tmp-x", ".tmp-", ".tmp-step-abc-1", "tmp-step-000000000003-1-aa", "step-abc"]
    for d in keep_dirs:
        (root / d).mkdir()
        (root / d / "f").write_text("keep")
    (root / ".tmp-step-000000000004-1-ab").write_text("a file, not a dir")
    (root / ".tmp-step-000000000005-1-ac").symlink_to(store.path(1))
    (root / "notes.txt").write_text("keep")
    leftover = root / ".tmp-step-000000000006-1-ad-deleted"
    leftover.mkdir()
    removed = store.cleanup_abandoned()
    assert sorted(removed) == sorted([w.tmp_path, str(leftover)])
    assert not os.path.exists(w.tmp_path) and not leftover.exists()
    for d in keep_dirs:
        assert (root / d / "f").read_text() == "keep"
    assert (root / ".tmp-step-000000000004-1-ab").is_file()
    assert (root / ".tmp-step-000000000005-1-ac").is_symlink()
    assert (root / "notes.txt").exists()
    assert store.validate(1).valid
    assert store.cleanup_abandoned() == []


# -- hypothesis: random directory states ------------------------------------------------------

# fsync is nearly free on tmpfs: the many small commits of the property test stay fast there.
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
DAMAGE = ["none", "extra_file", "bitflip", "truncate", "grow", "no_manifest", "bad_manifest",
          "missing_file", "wrong_step"]
FAST_INVALID = {"truncate", "grow", "no_manifest", "bad_manifest", "missing_file", "wrong_step"}
JUNK_DIRS = ["step-abc", "step-", ".tmp-x", "step-7", "lost+found", "step-000000000001.bak"]


def _damage(store: LocalSnapshotStore, step: int, how: str, other_step: int) -> None:
    p = store.path(step)
    data = os.path.join(p, "tensors.bin")
    if how == "extra_file":
        Path(p, "extra").write_bytes(b"x")
    elif how == "bitflip":
        flip_bit(data, 10)
    elif how == "truncate":
        os.truncate(data, 17)
    elif how == "grow":
        with open(data, "ab") as f:
            f.write(b"\0")
    elif how == "no_manifest":
        os.remove(os.path.join(p, "manifest.json"))
    elif how == "bad_manifest":
        Path(p, "manifest.json").write_bytes(b'{"files": ')
    elif how == "missing_file":
        os.remove(os.path.join(p, "tree.json"))
    elif how == "wrong_step":
        m = dataclasses.replace(store.read_manifest(step), step=other_step)
        Path(p, "manifest.json").write_bytes(m.to_json())


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    snaps=st.dictionaries(
        # Around digit-count boundaries, where string order and numeric order disagree.
        st.sampled_from([9, 10, 99, 100, 999_999_999_999, 10**12, 10**12 + 1])
        | st.integers(min_value=0, max_value=30)
        | st.integers(min_value=0, max_value=10**13),
        st.sampled_from(DAMAGE),
        max_size=6,
    ),
    junk=st.lists(st.sampled_from(JUNK_DIRS), unique=True, max_size=4),
    n_temp=st.integers(min_value=0, max_value=2),
    junk_file_step=st.none() | st.integers(min_value=0, max_value=10**13),
    max_step=st.none() | st.integers(min_value=0, max_value=10**13),
    verify=st.booleans(),
)
@example(
    snaps={999_999_999_999: "none", 10**12: "none", 10**12 + 1: "bitflip", 9: "none"},
    junk=["step-7"], n_temp=1, junk_file_step=10, max_step=None, verify=True,
)
def test_newest_valid_over_random_states(
    snaps: dict[int, str],
    junk: list[str],
    n_temp: int,
    junk_file_step: int | None,
    max_step: int | None,
    verify: bool,
) -> None:
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as d:
        store = LocalSnapshotStore(d)
        for step in sorted(snaps):
            commit(store, step, {"tensors.bin": b"t" * 64 + str(step).encode(), "tree.json": b"{}"})
        for step, how in snaps.items():
            _damage(store, step, how, step + 1)
        root = Path(store.root)
        for j in junk:
            (root / j).mkdir()
            (root / j / "manifest.json").write_text("{}")
        if junk_file_step is not None and junk_file_step not in snaps:
            (root / layout.snapshot_dirname(junk_file_step)).write_text("a file")
        temps = []
        for i in range(n_temp):
            w = store.begin(10**13 + i)  # in flight, at a step above everything committed
            w.write_bytes("tensors.bin", b"partial")
            temps.append(w.tmp_path)
        before = set(os.listdir(root))

        def ok(how: str) -> bool:
            return how in ("none", "extra_file") or (not verify and how == "bitflip")

        eligible = [s for s, how in snaps.items() if max_step is None or s <= max_step]
        expect = max((s for s in eligible if ok(snaps[s])), default=None)

        got = store.newest_valid(verify_checksums=verify, max_step=max_step)
        assert (got.step if got else None) == expect
        assert set(os.listdir(root)) == before  # no cleanup requested: nothing touched

        got = store.newest_valid(verify_checksums=verify, max_step=max_step, cleanup=True)
        assert (got.step if got else None) == expect
        after = set(os.listdir(root))
        removed = before - after
        expect_removed = {
            layout.snapshot_dirname(s)
            for s in eligible
            if not ok(snaps[s]) and (expect is None or s > expect)
        }
        assert removed == expect_removed
        assert after - before == set()
        for j in junk:
            assert (root / j / "manifest.json").exists()
        for t in temps:
            assert os.path.isdir(t)
        assert [i.step for i in store.list()] == sorted(set(snaps) - {
            s for s in snaps if layout.snapshot_dirname(s) in removed})
