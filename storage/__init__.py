"""Snapshot storage: layout, manifests with checksums, atomic commit, validation, retention.

This package has no torch dependency: the supervisor uses it to choose, verify and prune
snapshots without importing the training stack, and workers use it to write and read them.
"""

from storage.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from storage.errors import (
    CorruptSnapshot,
    DiskFull,
    ObjectNotFound,
    PermanentStorageError,
    SnapshotConflict,
    SnapshotNotFound,
    StorageError,
    TransientStorageError,
)
from storage.local import HashingFile, LocalSnapshotStore, SnapshotInfo, SnapshotWriter
from storage.logs import configure_logging
from storage.manifest import FileEntry, Manifest
from storage.retention import RetentionPolicy, plan_retention
from storage.settings import StorageSettings

__all__ = [
    "CorruptSnapshot",
    "DiskFull",
    "FileEntry",
    "HashingFile",
    "LocalSnapshotStore",
    "Manifest",
    "ObjectNotFound",
    "PermanentStorageError",
    "RetentionPolicy",
    "SnapshotConflict",
    "SnapshotInfo",
    "SnapshotNotFound",
    "SnapshotWriter",
    "StorageError",
    "StorageSettings",
    "TransientStorageError",
    "atomic_write_bytes",
    "atomic_write_json",
    "configure_logging",
    "fsync_dir",
    "plan_retention",
]
