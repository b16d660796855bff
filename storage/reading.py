"""Reading a committed snapshot file verified: streamed and hashed, or mapped and hashed beside.

Nothing read from a snapshot is trusted before its sha256 matches the manifest:
:func:`read_verified` hashes while it streams the file into the caller's buffer (or only hashes,
to validate), and :class:`MappedFile` maps it for decoding while a thread hashes it, the caller
waiting on :meth:`MappedFile.verified` before using a decoded value.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from concurrent import futures
from types import TracebackType
from typing import Any

import numpy as np

from contract.threads import run_in_thread
from storage.errors import CorruptSnapshot, StorageError, file_errors
from storage.manifest import FileEntry


def read_verified(
    fpath: str, name: str, entry: FileEntry, into: memoryview | None, chunk: int
) -> None:
    """Hash the file while reading it, into `into` (verifying loads) or a scratch buffer.

    Reads `chunk` bytes at a time; `CorruptSnapshot` unless size and checksum match `entry`.
    """
    h = hashlib.sha256()
    scratch = memoryview(bytearray(min(chunk, max(entry.size, 1)))) if into is None else None
    total = 0
    with file_errors(name, "reading", fpath), open(fpath, "rb", buffering=0) as f:
        while True:
            view = scratch if scratch is not None else into[total : total + chunk]  # type: ignore[index]
            if len(view) == 0:
                # The caller's buffer is full: one more byte means the file grew.
                if f.read(1):
                    raise CorruptSnapshot(f"{name}: larger than manifest size")
                break
            n = f.readinto(view)
            if not n:
                break
            h.update(view[:n])
            total += n
    if total != entry.size:
        raise CorruptSnapshot(f"{name}: read {total} bytes, manifest says {entry.size}")
    if h.hexdigest() != entry.checksum:
        raise CorruptSnapshot(f"{name}: checksum mismatch")


class MappedFile:
    """A committed snapshot file mapped into memory, its checksum verified on a thread meanwhile.

    Loading a snapshot used to read it into a fresh buffer (a copy, and a page fault per 4 KiB of
    never-touched memory) and hash it in the same loop, then decode it (a second copy). Mapped,
    the page cache is the buffer: the caller decodes straight from :attr:`array` while the hash
    runs beside it, and calls :meth:`verified` before using a single decoded value. The mapping
    is copy-on-write (``ACCESS_COPY``), so views of it are writable for torch yet never write to
    the file. The hash reads a second, read-only mapping of the same pages: a caller writing
    into its views before :meth:`verified` must neither fail a good file nor pass a bad one. Snapshots are immutable once committed; a file truncated under the mapping would
    raise SIGBUS in the reader, which ends that process (an attempt failure, never bad data).
    """

    def __init__(self, fpath: str, name: str, entry: FileEntry, chunk_bytes: int) -> None:
        self._name, self._entry, self._chunk = name, entry, chunk_bytes
        self._map: mmap.mmap | None = None
        self._hash_map: mmap.mmap | None = None
        with file_errors(name, "mapping", fpath), open(fpath, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.size:
                raise CorruptSnapshot(f"{name}: size {size} != manifest {entry.size}")
            if size:
                self._map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
                self._hash_map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        if self._map is not None:
            # Start reading the whole file ahead: the decoder and the hash both walk it in order.
            self._map.madvise(mmap.MADV_WILLNEED)
            self.array: np.ndarray[Any, Any] = np.frombuffer(self._map, dtype=np.uint8)
        else:
            self.array = np.zeros(0, dtype=np.uint8)
        self._digest = run_in_thread(self._hash, name=f"verify-{name}")

    def _hash(self) -> str:
        h = hashlib.sha256()
        if self._hash_map is not None:
            with memoryview(self._hash_map) as view:
                for start in range(0, len(view), self._chunk):
                    h.update(view[start : start + self._chunk])
        return h.hexdigest()

    def verified(self) -> None:
        """Wait for the hash; raise :class:`CorruptSnapshot` unless it matches the manifest."""
        error = self._digest.exception()
        if error is not None:
            raise StorageError(f"verifying {self._name}: {error}") from error
        if self._digest.result() != self._entry.checksum:
            raise CorruptSnapshot(f"{self._name}: checksum mismatch")

    def close(self) -> None:
        """Wait for the hash thread (it reads the mapping), then drop this object's references.

        The mapping itself is unmapped when the last view of :attr:`array` is gone (decoded
        tensors that are copies hold none).
        """
        futures.wait([self._digest])
        if self._hash_map is not None:
            self._hash_map.close()
            self._hash_map = None
        self.array = np.zeros(0, dtype=np.uint8)
        self._map = None

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
