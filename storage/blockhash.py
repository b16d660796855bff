"""File checksums of format-2 snapshots: the sha256 of a file's 64 KiB block hashes.

A version-1 manifest records each file's plain sha256. A version-2 manifest records
``sha256-b64k``: the sha256 of the concatenated sha256 digests of the file's consecutive
:data:`BLOCK_BYTES` blocks (the last one may be shorter; an empty file has no block and the
checksum of nothing). The point is that a block hash is a reusable piece: the snapshot writer
hashes every byte of ``tensors.bin`` once, and the content digest (:mod:`storage.content`) takes
each tensor's block hashes from the file's instead of hashing the tensor a second time
(tensors of at least a block are laid out on block boundaries for that). A tensor's own digest
is the same function of its bytes (:func:`tensor_digest`), so it equals the 64 KiB grid digest
of the sharded snapshots (:mod:`storage.sharded`), which lets both kinds share one definition.

Every verifier of a snapshot file takes its hasher from the file's entry
(:meth:`storage.manifest.FileEntry.hasher`), so readers never need to know which version wrote
the file.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

#: The block size of ``sha256-b64k`` checksums and of tensor digests.
BLOCK_BYTES = 64 << 10
#: The checksum algorithm of format-1 manifests: the plain sha256 of the file.
SHA256 = "sha256"
#: The checksum algorithm of format-2 manifests: sha256 over the 64 KiB block sha256s.
SHA256_BLOCKS = "sha256-b64k"
ALGORITHMS = frozenset({SHA256, SHA256_BLOCKS})


class FileHasher(Protocol):
    """What verifiers feed a file's bytes to, in order, in chunks of any size."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class BlockHasher:
    """The ``sha256-b64k`` checksum, fed in order in chunks of any size; keeps the block hashes.

    Whole blocks inside a chunk are hashed straight from the caller's buffer (hashlib releases
    the GIL for them); only a block split across two chunks is gathered in a small buffer.
    """

    def __init__(self) -> None:
        self._blocks: list[bytes] = []
        self._partial = hashlib.sha256()
        self._partial_len = 0
        self._size = 0

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        view = memoryview(data).cast("B")
        n, at = len(view), 0
        if self._partial_len:
            take = min(n, BLOCK_BYTES - self._partial_len)
            self._partial.update(view[:take])
            self._partial_len += take
            at = take
            if self._partial_len == BLOCK_BYTES:
                self._blocks.append(self._partial.digest())
                self._partial, self._partial_len = hashlib.sha256(), 0
        sha = hashlib.sha256
        append = self._blocks.append
        while n - at >= BLOCK_BYTES:
            append(sha(view[at : at + BLOCK_BYTES]).digest())
            at += BLOCK_BYTES
        if at < n:
            self._partial.update(view[at:])
            self._partial_len += n - at
        self._size += n

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    @property
    def aligned(self) -> bool:
        """Whether the bytes fed so far end on a block boundary (:meth:`add_blocks` may follow)."""
        return self._partial_len == 0

    def add_blocks(self, hashes: list[bytes], nbytes: int) -> None:
        """Append the hashes of ``nbytes`` of whole blocks hashed elsewhere (by
        :func:`block_hashes`, e.g. on another thread), as if :meth:`update` had been fed them."""
        if self._partial_len:
            raise ValueError("add_blocks after a partial block")
        if nbytes != len(hashes) * BLOCK_BYTES:
            raise ValueError(f"{len(hashes)} block hashes for {nbytes} bytes")
        self._blocks.extend(hashes)
        self._size += nbytes

    def blocks(self) -> list[bytes]:
        """Every block's sha256 (32 bytes each), the last partial block included."""
        if self._partial_len:
            return [*self._blocks, self._partial.copy().digest()]
        return list(self._blocks)

    def digest(self) -> bytes:
        h = hashlib.sha256()
        for block in self._blocks:
            h.update(block)
        if self._partial_len:
            h.update(self._partial.copy().digest())
        return h.digest()

    def hexdigest(self) -> str:
        return self.digest().hex()


def block_hashes(data: bytes | bytearray | memoryview) -> list[bytes]:
    """The sha256 of each whole 64 KiB block of ``data`` (a multiple of the block size)."""
    view = memoryview(data).cast("B")
    if len(view) % BLOCK_BYTES:
        raise ValueError(f"{len(view)} bytes is not a whole number of blocks")
    sha = hashlib.sha256
    return [sha(view[at : at + BLOCK_BYTES]).digest() for at in range(0, len(view), BLOCK_BYTES)]


def new_hasher(algorithm: str) -> FileHasher:
    """A fresh hasher for ``algorithm`` (``ValueError`` for one this version does not know)."""
    if algorithm == SHA256_BLOCKS:
        return BlockHasher()
    if algorithm == SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def tensor_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of one tensor's bytes: sha256 over the sha256 of each of its 64 KiB blocks."""
    h = BlockHasher()
    h.update(data)
    return h.digest()


def checksum_of(data: bytes | bytearray | memoryview, algorithm: str) -> str:
    """The checksum of bytes held in memory, by ``algorithm``."""
    h = new_hasher(algorithm)
    h.update(data)
    return h.hexdigest()
