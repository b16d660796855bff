"""Writing one snapshot file: hashed while written, O_DIRECT where the disk allows, fsynced.

:class:`HashingFile` computes a file's size and checksum (``sha256-b64k`` unless told otherwise,
:mod:`storage.blockhash`) as its bytes pass through (no second read pass), on a helper thread
beside the writes, and fsyncs it on close; its :class:`FileEntry` goes into the manifest, and its
block hashes stay available (:attr:`HashingFile.hasher`) for the content digest. The snapshot
writer (:mod:`storage.writer`) makes one per file.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import numpy as np

from storage.blockhash import (
    BLOCK_BYTES,
    SHA256_BLOCKS,
    BlockHasher,
    FileHasher,
    block_hashes,
    new_hasher,
)
from storage.errors import StorageError, os_error
from storage.manifest import FileEntry

#: O_DIRECT needs the buffer address, file offset and length aligned to the logical block size;
#: 4096 covers every block size in use.
DIRECT_ALIGN = 4096


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


class HashingFile:
    """A write-only file that computes its size and sha256 as bytes pass through.

    Hashing a chunk runs on a helper thread while the chunk is written (hashlib and ``os.write``
    both release the GIL), so the file costs max(hash, write) rather than their sum, and a
    background writer never stalls the training thread. With ``hash_threads`` > 1 and a
    ``sha256-b64k`` checksum, up to that many threads hash consecutive chunks at once (each
    chunk's block hashes are independent of the others'; they are joined in order), so a disk
    faster than one SHA-256 core is not held to its speed. With ``direct`` the file is opened with
    ``O_DIRECT`` (bypassing the page cache) and aligned chunks go straight to the device; an
    unaligned tail, or a filesystem that refuses ``O_DIRECT`` (tmpfs), falls back to buffered
    writes, and ``close()`` fsyncs either way.
    """

    def __init__(
        self,
        path: str,
        chunk_bytes: int,
        *,
        on_error: Callable[[], None] | None = None,
        direct: bool = False,
        algorithm: str = SHA256_BLOCKS,
        hash_threads: int = 1,
    ) -> None:
        self.path = path
        self._chunk = chunk_bytes
        self._threads = max(1, hash_threads)
        self._on_error = on_error
        self._algorithm = algorithm
        self._hash: FileHasher = new_hasher(algorithm)
        self._size = 0
        self._entry: FileEntry | None = None
        self._hasher: ThreadPoolExecutor | None = None
        # O_EXCL already refuses any existing name, a symlink included; O_NOFOLLOW says so.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self._fd: int | None = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as exc:
            if not (self.direct and exc.errno == errno.EINVAL):
                raise os_error(exc, f"creating {path}") from exc
            self.direct = False  # this filesystem has no O_DIRECT
            try:
                self._fd = os.open(path, flags, 0o644)
            except OSError as exc2:
                raise os_error(exc2, f"creating {path}") from exc2

    def _buffered(self) -> None:
        """Turn O_DIRECT off for the rest of the file (an unaligned piece must be written)."""
        if self.direct and self._fd is not None:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False

    def _write_all(self, chunk: memoryview) -> None:
        fd = self._fd
        if fd is None:
            raise StorageError(f"write to closed snapshot file {self.path}")
        if self.direct and (
            len(chunk) % DIRECT_ALIGN or self._size % DIRECT_ALIGN or _address(chunk) % DIRECT_ALIGN
        ):
            self._buffered()
        pos = 0
        while pos < len(chunk):
            try:
                pos += os.write(fd, chunk[pos:])
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._buffered()  # the device wants a larger alignment than DIRECT_ALIGN
        self._size += len(chunk)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._fd is None:
            raise StorageError(f"write to closed snapshot file {self.path}")
        view = memoryview(data).cast("B")
        total = len(view)
        if total > self._chunk and self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="storage-hash")
        h = self._hash
        blocks = h if isinstance(h, BlockHasher) else None
        # Parallel: whole-block chunks hashed by any free thread, joined in order below.
        parallel = (self._threads > 1 and self._hasher is not None and blocks is not None
                    and blocks.aligned and self._chunk % BLOCK_BYTES == 0)
        pending: Future[None] | None = None
        pieces: list[tuple[Future[list[bytes]], int]] = []
        tail: memoryview | None = None
        try:
            for pos in range(0, total, self._chunk):
                chunk = view[pos : pos + self._chunk]
                if self._hasher is None:
                    h.update(chunk)
                elif parallel:
                    whole = len(chunk) - len(chunk) % BLOCK_BYTES  # short only in the last chunk
                    pieces.append((self._hasher.submit(block_hashes, chunk[:whole]), whole))
                    if whole < len(chunk):
                        tail = chunk[whole:]
                else:
                    # Updates in order, each beside the write of its chunk (the pool may have
                    # several threads: the previous update must be done before the next starts);
                    # the caller's buffer is only read until write() returns.
                    if pending is not None:
                        pending.result()
                    pending = self._hasher.submit(h.update, chunk)
                self._write_all(chunk)
        except OSError as exc:
            self._failed()
            raise os_error(exc, f"writing {self.path}") from exc
        finally:
            if pending is not None:
                pending.result()
            if blocks is not None and pieces:
                for fut, nbytes in pieces:
                    blocks.add_blocks(fut.result(), nbytes)
                if tail is not None:
                    blocks.update(tail)
        return total

    def close(self) -> FileEntry:
        """Fsync and close; returns the entry for the manifest. Idempotent."""
        if self._entry is not None:
            return self._entry
        fd, self._fd = self._fd, None
        if fd is None:
            raise StorageError(f"{self.path} was abandoned")
        try:
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self._failed()
            raise os_error(exc, f"fsyncing {self.path}") from exc
        os.close(fd)
        self._stop_hasher()
        self._entry = FileEntry(
            size=self._size, checksum=self._hash.hexdigest(), algorithm=self._algorithm
        )
        return self._entry

    @property
    def hasher(self) -> FileHasher:
        """The file's hasher (a :class:`BlockHasher` for ``sha256-b64k``, whose block hashes
        the content digest reuses); complete once :meth:`close` returned."""
        return self._hash

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None

    def _failed(self) -> None:
        """A write or fsync failed: the file is unusable; let the owner free the space now."""
        self.discard()
        if self._on_error is not None:
            self._on_error()

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._stop_hasher()

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
        else:
            self.discard()
