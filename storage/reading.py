"""Reading a committed snapshot file verified: streamed and hashed, or mapped and hashed beside.

Nothing read from a snapshot is trusted before its checksum matches the manifest:
:func:`read_verified` hashes while it streams the file into the caller's buffer (or only hashes,
to validate), and :class:`MappedFile` maps it for decoding while a thread hashes it, the caller
waiting on :meth:`MappedFile.verified` before using a decoded value. Given a content plan
(:mod:`storage.content`), both also feed the tensor bytes they hash into the content digest and
compare it with the manifest's: the state decoded is then the state that was saved, not merely
the files that were written.

Every snapshot file is opened with :func:`open_snapshot_file`: never through a symlink
(``O_NOFOLLOW``), never blocking on a fifo (``O_NONBLOCK``), and only a regular file (``fstat``
after the open, so nothing can be swapped in between a check and the read).
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import stat
from concurrent import futures
from types import TracebackType
from typing import Any

import numpy as np

from contract.threads import run_in_thread
from storage.blockhash import FileHasher
from storage.content import ContentHasher, ContentPlan, check_digest
from storage.errors import CorruptSnapshot, StorageError, file_errors
from storage.manifest import FileEntry

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | _OPEN_FLAGS)


def open_snapshot_file(fpath: str, name: str) -> io.RawIOBase:
    """Open a snapshot file for reading: a regular file inside the snapshot, never a link.

    ``CorruptSnapshot`` for a symlink (``ELOOP`` from ``O_NOFOLLOW``), a fifo, socket, device or
    directory; the type is checked with ``fstat`` on the open descriptor, so what is read is
    what was checked. Other OS errors are translated by :func:`storage.errors.file_errors`.
    """
    try:
        f = open(fpath, "rb", buffering=0, opener=_no_follow)  # noqa: SIM115 - returned open
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptSnapshot(f"{name}: a symlink, not a file of the snapshot") from exc
        raise
    try:
        fd = f.fileno()
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CorruptSnapshot(f"{name}: not a regular file ({_kind(mode)})")
        # Blocking again: O_NONBLOCK was only there so that opening a fifo cannot hang.
        os.set_blocking(fd, True)
    except BaseException:
        f.close()
        raise
    return f


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return kind
    return "not a plain file"


def read_verified(
    fpath: str,
    name: str,
    entry: FileEntry,
    into: memoryview | None,
    chunk: int,
    *,
    content: ContentPlan | None = None,
    expected_digest: str | None = None,
) -> None:
    """Hash the file while reading it, into `into` (verifying loads) or a scratch buffer.

    Reads `chunk` bytes at a time; `CorruptSnapshot` unless size and checksum match `entry`.
    With `content` (the file is the arena that plan describes), the content digest is computed
    from the same reads and must equal `expected_digest`.
    """
    h = entry.hasher()
    hc = _content_hasher(content, expected_digest, entry)
    scratch = memoryview(bytearray(min(chunk, max(entry.size, 1)))) if into is None else None
    total = 0
    with file_errors(name, "reading", fpath), open_snapshot_file(fpath, name) as f:
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
            if hc is not None:
                hc.update(view[:n])
            total += n
    if total != entry.size:
        raise CorruptSnapshot(f"{name}: read {total} bytes, manifest says {entry.size}")
    if h.hexdigest() != entry.checksum:
        raise CorruptSnapshot(f"{name}: checksum mismatch")
    if hc is not None and expected_digest is not None:
        check_digest(hc.finish(h), expected_digest, name)


def _content_hasher(
    content: ContentPlan | None, expected_digest: str | None, entry: FileEntry
) -> ContentHasher | None:
    if content is None:
        return None
    if expected_digest is None:
        raise ValueError("a content plan needs the manifest's digest to compare with")
    if content.arena_nbytes != entry.size:
        raise CorruptSnapshot(
            f"the tree describes an arena of {content.arena_nbytes} bytes, the file has {entry.size}"
        )
    return content.hasher()


class MappedFile:
    """A committed snapshot file mapped into memory, its checksum verified on a thread meanwhile.

    Loading a snapshot used to read it into a fresh buffer (a copy, and a page fault per 4 KiB of
    never-touched memory) and hash it in the same loop, then decode it (a second copy). Mapped,
    the page cache is the buffer: the caller decodes straight from :attr:`array` while the hash
    runs beside it, and calls :meth:`verified` before using a single decoded value. The mapping
    is copy-on-write (``ACCESS_COPY``), so views of it are writable for torch yet never write to
    the file. The hash reads a second, read-only mapping of the same pages: a caller writing
    into its views before :meth:`verified` must neither fail a good file nor pass a bad one.
    Snapshots are immutable once committed; a file truncated under the mapping would raise
    SIGBUS in the reader, which ends that process (an attempt failure, never bad data).

    With ``content`` (the plan of the tree this file is the arena of) and ``expected_digest``
    (the manifest's), a second thread computes the content digest from the same read-only
    mapping beside the checksum (hashlib releases the GIL: on a free core it costs no wall
    time; for a v2 tree it hashes only the bytes the checksum's blocks do not cover), and
    :meth:`verified` also requires it to match.
    """

    def __init__(
        self,
        fpath: str,
        name: str,
        entry: FileEntry,
        chunk_bytes: int,
        *,
        content: ContentPlan | None = None,
        expected_digest: str | None = None,
    ) -> None:
        self._name, self._entry, self._chunk = name, entry, chunk_bytes
        self._map: mmap.mmap | None = None
        self._hash_map: mmap.mmap | None = None
        self._expected_digest = expected_digest
        content_hasher = _content_hasher(content, expected_digest, entry)
        with file_errors(name, "mapping", fpath), open_snapshot_file(fpath, name) as f:
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
        self._file_hasher = entry.hasher()
        self._digest = run_in_thread(self._hash, name=f"verify-{name}")
        self._content: futures.Future[None] | None = None
        self._content_hasher = content_hasher
        if content_hasher is not None:
            self._content = run_in_thread(
                lambda: self._feed(content_hasher), name=f"content-{name}"
            )

    def _hash(self) -> str:
        self._feed(self._file_hasher)
        return self._file_hasher.hexdigest()

    def _feed(self, hasher: FileHasher | ContentHasher) -> None:
        if self._hash_map is not None:
            with memoryview(self._hash_map) as view:
                for start in range(0, len(view), self._chunk):
                    hasher.update(view[start : start + self._chunk])

    def verified(self) -> None:
        """Wait for the hashes; raise :class:`CorruptSnapshot` unless they match the manifest.

        The file checksum first (a damaged file is the likelier story), then the content digest.
        """
        error = self._digest.exception()
        if error is not None:
            raise StorageError(f"verifying {self._name}: {error}") from error
        if self._digest.result() != self._entry.checksum:
            raise CorruptSnapshot(f"{self._name}: checksum mismatch")
        if self._content is not None and self._expected_digest is not None:
            error = self._content.exception()
            if error is not None:
                raise StorageError(f"verifying the content of {self._name}: {error}") from error
            if self._content_hasher is not None:
                digest = self._content_hasher.finish(self._file_hasher)
                check_digest(digest, self._expected_digest, self._name)

    def close(self) -> None:
        """Wait for the hash thread (it reads the mapping), then drop this object's references.

        The mapping itself is unmapped when the last view of :attr:`array` is gone (decoded
        tensors that are copies hold none).
        """
        running: list[futures.Future[Any]] = [self._digest]
        if self._content is not None:
            running.append(self._content)
        futures.wait(running)
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
