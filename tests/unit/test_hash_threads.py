"""Hashing one snapshot file on several threads (ORCH_STORAGE_HASH_THREADS) gives exactly the
checksum and block hashes of one thread, whatever the write pattern."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.blockhash import BLOCK_BYTES, SHA256_BLOCKS, BlockHasher, block_hashes, checksum_of
from storage.hashfile import HashingFile
from storage.settings import StorageSettings

pytestmark = pytest.mark.timeout(60)

CHUNK = 4 * BLOCK_BYTES


@pytest.mark.parametrize(
    "writes",
    [
        [CHUNK * 7],                      # whole chunks
        [CHUNK * 5 + 12345],              # a short last chunk with a partial block
        [100, CHUNK * 6],                 # unaligned start: the single-thread path
        [CHUNK * 3, CHUNK * 2 + 7, CHUNK * 4],  # a partial block mid-file, then large writes
        [CHUNK * 2 + BLOCK_BYTES, CHUNK * 3],
        [0, 1, CHUNK + 1],
    ],
    ids=["whole", "short-tail", "unaligned-start", "partial-mid", "block-tail", "tiny"],
)
@pytest.mark.parametrize("threads", [2, 5])
def test_parallel_hashing_equals_one_thread(tmp_path: Path, writes: list[int], threads: int) -> None:
    data = os.urandom(sum(writes))
    entries, blocks = [], []
    for n in (1, threads):
        f = HashingFile(str(tmp_path / f"f{n}"), CHUNK, hash_threads=n)
        at = 0
        for size in writes:
            f.write(memoryview(data)[at : at + size])
            at += size
        entries.append(f.close())
        hasher = f.hasher
        assert isinstance(hasher, BlockHasher)
        blocks.append(hasher.blocks())
        assert (tmp_path / f"f{n}").read_bytes() == data
    assert entries[0] == entries[1]
    assert entries[0].checksum == checksum_of(data, SHA256_BLOCKS)
    assert blocks[0] == blocks[1]


def test_add_blocks_refuses_what_update_would_not_produce() -> None:
    h = BlockHasher()
    h.update(b"x")
    with pytest.raises(ValueError, match="partial"):
        h.add_blocks(block_hashes(bytes(BLOCK_BYTES)), BLOCK_BYTES)
    with pytest.raises(ValueError, match="block hashes for"):
        BlockHasher().add_blocks(block_hashes(bytes(BLOCK_BYTES)), 2 * BLOCK_BYTES)
    with pytest.raises(ValueError, match="whole number"):
        block_hashes(b"abc")


def test_hash_threads_setting_is_validated() -> None:
    assert StorageSettings.from_env({"ORCH_STORAGE_HASH_THREADS": "4"}).hash_threads == 4
    with pytest.raises(ValueError, match="ORCH_STORAGE_HASH_THREADS"):
        StorageSettings.from_env({"ORCH_STORAGE_HASH_THREADS": "0"})
