"""The storage error family.

Every failure the storage layer reports is a `StorageError`. Callers branch on the subclass:
`TransientStorageError` is the only kind worth retrying (and only one layer retries it),
`PermanentStorageError` (bad credentials, access denied, a missing bucket) is reported at once
and never retried, `CorruptSnapshot` means the bytes on a tier cannot be trusted and another snapshot must be
chosen, `DiskFull` means a save failed for lack of space while every older snapshot is intact.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by the storage layer."""


class TransientStorageError(StorageError):
    """A failure that may succeed when retried (a timeout, a reset connection, a 5xx)."""


class CorruptSnapshot(StorageError):
    """A snapshot whose manifest is missing or unreadable, or whose files do not match it."""


class SnapshotNotFound(StorageError):
    """No committed snapshot exists for the requested step."""


class DiskFull(StorageError):
    """A write failed with ENOSPC/EDQUOT; the partial snapshot was removed, older ones are intact."""


class PermanentStorageError(StorageError):
    """A failure retrying cannot fix: access denied, bad credentials, a missing bucket.

    Messages name the bucket or URL, never the credentials.
    """


class ObjectNotFound(StorageError):
    """The requested object does not exist in the object store."""


class SnapshotConflict(StorageError):
    """A different snapshot (another digest) is already committed at this step on the remote."""
