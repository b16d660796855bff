"""Disk full on a real small tmpfs: DiskFull, the partial snapshot removed, older ones intact."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import DiskFull, LocalSnapshotStore, StorageError

DIGEST = "sha256:" + "0" * 64
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards; skips where mounting is not permitted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run mount (needs root or CAP_SYS_ADMIN): {exc}")
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)


def _commit(store: LocalSnapshotStore, step: int, data: bytes) -> None:
    w = store.begin(step)
    try:
        w.write_bytes("tensors.bin", data)
        w.write_bytes("tree.json", b"{}")
        w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    except BaseException:
        w.abort()
        raise


def _temps(store: LocalSnapshotStore) -> list[str]:
    return [e for e in os.listdir(store.root) if e.startswith(".tmp-")]


def test_disk_full_during_write(small_fs: Path) -> None:
    store = LocalSnapshotStore(str(small_fs))
    small = os.urandom(100_000)
    _commit(store, 1, small)
    free_before = os.statvfs(small_fs).f_bavail

    w = store.begin(2)
    with pytest.raises(DiskFull) as ei, w.open("tensors.bin") as f:
        for _ in range(40):  # 2.5 MiB in 64 KiB pieces: far more than the 1 MiB disk
            f.write(b"\xab" * 65536)
    assert isinstance(ei.value, StorageError)
    assert isinstance(ei.value.__cause__, OSError)
    assert ei.value.__cause__.errno in (errno.ENOSPC, errno.EDQUOT)
    # The failed write aborted the snapshot by itself: its space is free again at once.
    assert _temps(store) == []
    assert os.statvfs(small_fs).f_bavail >= free_before
    w.abort()  # still allowed, a no-op
    with pytest.raises(StorageError):
        w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)

    assert [i.step for i in store.list()] == [1]
    info = store.validate(1, verify_checksums=True)
    assert info.valid, info.reason
    assert store.open_verified(1, "tensors.bin") == small
    newest = store.newest_valid()
    assert newest is not None and newest.step == 1
    # Space is back: the next (small) save works.
    _commit(store, 3, small)
    assert store.validate(3).valid


def test_disk_full_write_bytes_and_commit(small_fs: Path) -> None:
    store = LocalSnapshotStore(str(small_fs))
    small = os.urandom(50_000)
    _commit(store, 1, small)
    with pytest.raises(DiskFull):
        _commit(store, 2, b"\0" * (2 * 1024 * 1024))
    assert _temps(store) == []
    assert [i.step for i in store.list()] == [1]
    assert store.validate(1).valid


def test_disk_full_while_writing_manifest(small_fs: Path) -> None:
    """Data files fit, then the disk is full when the manifest (written last) is written."""
    store = LocalSnapshotStore(str(small_fs))
    small = os.urandom(50_000)
    _commit(store, 1, small)
    w = store.begin(2)
    w.write_bytes("tensors.bin", b"x" * 1000)
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # eat every remaining byte
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(DiskFull):
        w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    assert _temps(store) == []
    assert not os.path.exists(store.path(2))
    assert [i.step for i in store.list()] == [1]
    assert store.validate(1).valid
