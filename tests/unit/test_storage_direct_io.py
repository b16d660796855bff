"""HashingFile with O_DIRECT and pipelined hashing: same bytes and checksum as a plain write."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

import pytest

from storage.local import DIRECT_ALIGN, HashingFile


def aligned(nbytes: int, seed: int = 1) -> memoryview:
    """A page-aligned buffer (mmap) of pseudo-random bytes."""
    buf = mmap.mmap(-1, nbytes)
    block = hashlib.sha256(str(seed).encode()).digest() * 4096
    for lo in range(0, nbytes, len(block)):
        buf[lo : min(nbytes, lo + len(block))] = block[: min(nbytes, lo + len(block)) - lo]
    return memoryview(buf)


def _blocks_checksum(data: bytes | bytearray | memoryview) -> str:
    """sha256-b64k written out here, independently of storage.blockhash."""
    raw = bytes(data)
    blocks = b"".join(hashlib.sha256(raw[i : i + 65536]).digest() for i in range(0, len(raw), 65536))
    return hashlib.sha256(blocks).hexdigest()


def test_a_format_1_file_gets_its_plain_sha256(tmp_path: Path) -> None:
    data = aligned(3 * (1 << 16) + 123)
    f = HashingFile(str(tmp_path / "f.bin"), 1 << 16, algorithm="sha256")
    f.write(data)
    entry = f.close()
    assert (entry.checksum, entry.algorithm) == (hashlib.sha256(data).hexdigest(), "sha256")


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", [0, DIRECT_ALIGN, 3 * (1 << 16), 3 * (1 << 16) + 123, 1 << 20])
def test_bytes_and_checksum_match(tmp_path: Path, direct: bool, size: int) -> None:
    data = aligned(max(size, 1))[:size]
    path = tmp_path / "f.bin"
    f = HashingFile(str(path), 1 << 16, direct=direct)  # several chunks: the hasher pipelines
    f.write(data)
    entry = f.close()
    assert path.read_bytes() == bytes(data)
    assert entry.size == size
    assert entry.checksum == _blocks_checksum(data)


def test_unaligned_pieces_fall_back_to_buffered_and_stay_correct(tmp_path: Path) -> None:
    data = aligned(1 << 20)
    path = tmp_path / "f.bin"
    f = HashingFile(str(path), 1 << 16, direct=True)
    f.write(data[: 1 << 18])       # aligned: O_DIRECT where the filesystem has it
    f.write(data[(1 << 18) : (1 << 18) + 5])      # unaligned length: buffered from here on
    f.write(bytes(data[(1 << 18) + 5 :]))         # unaligned address (a bytes copy)
    assert not f.direct
    entry = f.close()
    assert path.read_bytes() == bytes(data)
    assert entry.checksum == _blocks_checksum(data)


def test_direct_engages_on_a_filesystem_that_supports_it(tmp_path: Path) -> None:
    # The fallback must not hide that O_DIRECT silently never engages on a real disk.
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")
    f = HashingFile(str(tmp_path / "f.bin"), 1 << 16, direct=True)
    f.write(aligned(1 << 18))
    assert f.direct
    f.close()


def test_filesystem_without_o_direct_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:  # what tmpfs on older kernels answers
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    f = HashingFile(str(tmp_path / "f.bin"), 1 << 16, direct=True)
    assert not f.direct
    data = aligned(1 << 18)
    f.write(data)
    assert f.close().checksum == _blocks_checksum(data)
    assert (tmp_path / "f.bin").read_bytes() == bytes(data)
