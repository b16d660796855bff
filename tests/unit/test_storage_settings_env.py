"""The ORCH_STORAGE_* variables reach a store built without explicit settings.

Stores used to default to ``StorageSettings()``, so these variables were documented yet ignored.
Each test sets one variable, builds a store with no ``settings=``, and observes the behaviour the
variable controls at the system-call boundary (write sizes, open flags, read sizes); each fails
if the store falls back to the built-in default.
"""

from __future__ import annotations

import builtins
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from storage import LocalSnapshotStore
from storage.remote import RemoteSnapshotStore

DIGEST = "sha256:" + "0" * 64
DEFAULT_CHUNK = 16 * 1024 * 1024  # the registry default both chunk sizes must differ from


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ORCH_STORAGE_DIRECT_IO",
        "ORCH_STORAGE_WRITE_CHUNK_BYTES",
        "ORCH_STORAGE_READ_CHUNK_BYTES",
    ):
        monkeypatch.delenv(name, raising=False)


def _under(fd_or_path: int | str, root: Path) -> bool:
    path = os.readlink(f"/proc/self/fd/{fd_or_path}") if isinstance(fd_or_path, int) else fd_or_path
    return os.path.abspath(path).startswith(str(root))


def _commit(store: LocalSnapshotStore, step: int, data: bytes) -> None:
    w = store.begin(step)
    w.write_bytes("tensors.bin", data)
    w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)


def test_write_chunk_bytes_from_env_bounds_each_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_STORAGE_WRITE_CHUNK_BYTES", "4096")
    store = LocalSnapshotStore(str(tmp_path))  # no settings: the environment decides
    sizes: list[int] = []
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if _under(fd, tmp_path) and not os.readlink(f"/proc/self/fd/{fd}").endswith("json"):
            sizes.append(len(memoryview(data)))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    _commit(store, 1, bytes(range(256)) * 256)  # 64 KiB
    assert sizes == [4096] * 16  # the default (16 MiB) would write it in one call
    assert store.validate(1).valid


@pytest.mark.parametrize(("value", "direct"), [("0", False), ("1", True)])
def test_direct_io_from_env_decides_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, direct: bool
) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    monkeypatch.setenv("ORCH_STORAGE_DIRECT_IO", value)
    store = LocalSnapshotStore(str(tmp_path))
    attempts: list[bool] = []
    real_open = os.open

    def open_(path: str, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if str(path).endswith("tensors.bin"):
            # The first open of the file says what was asked; a filesystem without O_DIRECT
            # (tmpfs) makes the writer retry buffered, which is not the setting's doing.
            attempts.append(bool(flags & os.O_DIRECT))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", open_)
    w = store.begin(2)
    with w.open("tensors.bin", direct=True) as f:  # the caller asks; the setting may refuse
        f.write(bytes(8192))
    w.commit(run_id="r", epoch=0, world_size=1, digest=DIGEST)
    assert attempts[0] is direct  # default (on) would try O_DIRECT for "0" as well
    assert store.validate(2).valid


class _CountingFile(io.FileIO):
    """A raw file that records the size of every read it is asked for."""

    sizes: list[int]

    def readinto(self, buffer: Any) -> int | None:
        self.sizes.append(len(memoryview(buffer)))
        return super().readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        self.sizes.append(size)
        return super().read(size)


def _count_reads(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[int]:
    """Reads of files under ``root`` opened unbuffered (``open(p, "rb", buffering=0)``)."""
    sizes: list[int] = []
    real_open: Callable[..., Any] = builtins.open

    def open_(file: Any, mode: str = "r", buffering: int = -1, *a: Any, **kw: Any) -> Any:
        if mode == "rb" and buffering == 0 and isinstance(file, str) and _under(file, root):
            f = _CountingFile(file, "rb")
            f.sizes = sizes
            return f
        return real_open(file, mode, buffering, *a, **kw)

    monkeypatch.setattr(builtins, "open", open_)
    return sizes


def test_read_chunk_bytes_from_env_bounds_checksum_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    _commit(LocalSnapshotStore(str(tmp_path)), 3, data)
    monkeypatch.setenv("ORCH_STORAGE_READ_CHUNK_BYTES", "1000")
    store = LocalSnapshotStore(str(tmp_path))
    sizes = _count_reads(monkeypatch, tmp_path)
    assert store.validate(3, verify_checksums=True).valid
    assert sizes and max(sizes) == 1000 and len(sizes) >= 11  # default: one 10240-byte read
    sizes.clear()
    assert store.open_verified(3, "tensors.bin") == data
    assert sizes and max(sizes) == 1000


def test_read_chunk_bytes_from_env_reaches_the_remote_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The remote tier reads local snapshot files in read_chunk_bytes pieces while uploading,
    # reporting progress once per piece.
    data = bytes(range(256)) * 40
    local = LocalSnapshotStore(str(tmp_path / "ck"))
    _commit(local, 4, data)
    monkeypatch.setenv("ORCH_STORAGE_READ_CHUNK_BYTES", "1024")
    remote = RemoteSnapshotStore((tmp_path / "mirror").as_uri())  # no settings
    done: list[int] = []
    remote.upload(local, 4, progress=lambda n, total: done.append(n))
    assert done == list(range(1024, len(data) + 1, 1024))  # default: [10240]
    assert remote.validate(4).valid
