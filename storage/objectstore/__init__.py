"""Object stores behind one small protocol: S3 through boto3, everything else through fsspec.

The remote snapshot tier (`storage.remote`) needs only a handful of operations on flat keys
relative to the mirror URL's prefix: upload a local file (verifying its bytes against an expected
checksum while reading it, so a file that rotted on disk is never shipped), put small objects
with an optional put-if-absent, stream an object into a writable file, head, list, delete, and
abort stale multipart uploads. This package holds that protocol and the factory; each backend
has its own module (:mod:`~storage.objectstore.s3`, :mod:`~storage.objectstore.fsspec_store`),
and :mod:`~storage.objectstore.errors` maps their failures onto the storage error family.
"""

from __future__ import annotations

import builtins
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

from storage.manifest import FileEntry
from storage.objectstore.common import Pacing, Progress, Writable
from storage.objectstore.fsspec_store import FsspecObjectStore
from storage.objectstore.s3 import S3ObjectStore
from storage.settings import StorageSettings


@runtime_checkable
class ObjectStore(Protocol):
    """Flat keys (``a/b/c``) relative to the store's URL prefix."""

    url: str

    def put_file(
        self,
        key: str,
        local_path: str,
        *,
        size: int,
        expected: FileEntry | None = None,
        progress: Progress | None = None,
        pacing: Pacing | None = None,
    ) -> None:
        """Upload a local file of `size` bytes. With `expected` (the manifest's entry), the bytes
        read are hashed once by its algorithm and a checksum other than the entry's raises
        `CorruptSnapshot` before the object becomes visible.
        With `pacing`, the bytes go out at the pace it sets, from threads it has prepared."""
        ...

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> bool:
        """Write a small object. With `if_none_match`, False means it already existed."""
        ...

    def get_into(
        self, key: str, writable: Writable, *, expected_size: int, progress: Progress | None = None
    ) -> None:
        """Stream the object, in order, into `writable.write`; a size other than
        `expected_size` raises `CorruptSnapshot`, a missing object `ObjectNotFound`."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The whole object (small objects only); `ObjectNotFound` when missing."""
        ...

    def head(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        ...

    def list(self, prefix: str) -> builtins.list[tuple[str, int]]:
        """(key, size) of every object whose key starts with `prefix`, sorted by key."""
        ...

    def delete(self, keys: builtins.list[str]) -> None:
        """Delete the keys (missing keys are fine), in the given order."""
        ...

    def abort_incomplete_uploads(self, prefix: str = "", *, older_than_s: float = 0.0) -> int:
        """Abort multipart uploads under `prefix`: those this store started and failed to abort
        (whatever their age: no other writer owns them), then every one started more than
        `older_than_s` ago; how many. One try per request, the first failure raised (a
        `TransientStorageError` is for the caller's retry layer)."""
        ...

    def preflight(self) -> None:
        """Check the store is reachable and writable; `PermanentStorageError` if it never will be."""
        ...


def open_object_store(url: str, *, settings: StorageSettings | None = None) -> ObjectStore:
    """`S3ObjectStore` for ``s3://bucket/prefix``, `FsspecObjectStore` for any other URL."""
    settings = settings or StorageSettings.from_env()
    scheme = urlparse(url).scheme.lower()
    if scheme in ("s3", "s3a"):
        return S3ObjectStore(url, settings=settings)
    if not scheme:
        raise ValueError(f"mirror URL needs a scheme (s3://, file://, memory://, ...): {url!r}")
    return FsspecObjectStore(url, settings=settings)


__all__ = [
    "FsspecObjectStore",
    "ObjectStore",
    "Pacing",
    "Progress",
    "S3ObjectStore",
    "Writable",
    "open_object_store",
]
