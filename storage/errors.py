"""The storage error family.

Every failure the storage layer reports is a `StorageError`. Callers branch on the subclass:
`TransientStorageError` is the only kind worth retrying (and only one layer retries it),
`PermanentStorageError` (bad credentials, access denied, a missing bucket) is reported at once
and never retried, `CorruptSnapshot` means the bytes on a tier cannot be trusted and another snapshot must be
chosen, `DiskFull` means a save failed for lack of space while every older snapshot is intact,
`NotWritable` (read-only filesystem, permissions) is fatal: no retry can fix it.
OS errors on the local tier are translated into the family here, once (`os_error`, `file_errors`).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# Errors that say the snapshot's own structure is wrong (a listed file is a directory, its name is
# impossible), as opposed to the environment failing (EIO, EMFILE, EACCES): the former make a
# snapshot invalid, the latter are raised so that a good snapshot is never deleted for them.
_BAD_PATH = (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP)


class StorageError(Exception):
    """Base class of every error raised by the storage layer."""


class TransientStorageError(StorageError):
    """A failure that may succeed when retried (a timeout, a reset connection, a 5xx)."""


class CorruptSnapshot(StorageError):
    """A snapshot whose manifest is missing or unreadable, or whose files do not match it."""


class NewerSnapshotFormat(CorruptSnapshot):
    """A manifest of a format version newer than this code reads (written by a newer release).

    Unusable here, like a corrupt snapshot, but never deleted: after a downgrade it is still
    the newer release's data.
    """


class SnapshotNotFound(StorageError):
    """No committed snapshot exists for the requested step."""


class DiskFull(StorageError):
    """A write failed with ENOSPC/EDQUOT; the partial snapshot was removed, older ones are intact."""


class NotWritable(StorageError):
    """A write refused by the environment: a read-only filesystem (EROFS), permissions
    (EACCES, EPERM). Retrying cannot fix it, so it is fatal (``fatal`` is read by the workers'
    error files and the supervisor's policy): the run stops at once with this message."""

    fatal = True


class PermanentStorageError(StorageError):
    """A failure retrying cannot fix: access denied, bad credentials, a missing bucket.

    Messages name the bucket or URL, never the credentials.
    """


class ObjectNotFound(StorageError):
    """The requested object does not exist in the object store."""


class SnapshotConflict(StorageError):
    """A different snapshot (another digest) is already committed at this step on the remote."""


def os_error(exc: OSError, what: str) -> StorageError:
    """The storage error for ``exc`` raised while ``what``: `DiskFull` when out of space."""
    if exc.errno in _NO_SPACE:
        return DiskFull(f"no space left while {what}: {exc.strerror}")
    if exc.errno in _NOT_WRITABLE:
        return NotWritable(f"cannot write while {what}: {exc.strerror} ({exc.filename or 'path unknown'})")
    return StorageError(f"I/O error while {what}: {exc}")


@contextlib.contextmanager
def file_errors(name: str, doing: str, fpath: str) -> Iterator[None]:
    """Translate OS errors on a snapshot's file ``name``: a missing file or an impossible path
    makes the snapshot invalid (:class:`CorruptSnapshot`); anything else is the environment
    failing (:class:`StorageError`), which must never get a good snapshot deleted."""
    try:
        yield
    except FileNotFoundError as exc:
        raise CorruptSnapshot(f"{name}: missing") from exc
    except OSError as exc:
        if exc.errno in _BAD_PATH:
            raise CorruptSnapshot(f"{name}: {exc.strerror}") from exc
        raise StorageError(f"{doing} {fpath}: {exc}") from exc
