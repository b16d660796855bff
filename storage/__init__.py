"""Snapshot storage: layout, manifests with checksums, atomic commit, validation, retention.

This package has no torch dependency: the supervisor uses it to choose, verify and prune
snapshots without importing the training stack, and workers use it to write and read them.
"""

from storage.errors import (
    CorruptSnapshot,
    DiskFull,
    NotWritable,
    ObjectNotFound,
    PermanentStorageError,
    SnapshotConflict,
    SnapshotNotFound,
    StorageError,
    TransientStorageError,
)
from storage.local import HashingFile, LocalSnapshotStore, SnapshotWriter
from storage.manifest import FileEntry, Manifest
from storage.retention import RetentionPolicy, plan_retention
from storage.settings import StorageSettings
from storage.tier import (
    LocalTier,
    RemoteTier,
    SnapshotInfo,
    SnapshotTier,
    TransferProgress,
    UploadResult,
)

__all__ = [
    "CorruptSnapshot",
    "DiskFull",
    "FileEntry",
    "HashingFile",
    "LocalSnapshotStore",
    "LocalTier",
    "Manifest",
    "NotWritable",
    "ObjectNotFound",
    "PermanentStorageError",
    "RemoteTier",
    "RetentionPolicy",
    "SnapshotConflict",
    "SnapshotInfo",
    "SnapshotNotFound",
    "SnapshotTier",
    "SnapshotWriter",
    "StorageError",
    "StorageSettings",
    "TransferProgress",
    "TransientStorageError",
    "UploadResult",
    "plan_retention",
]
