"""The snapshot manifest: what a snapshot claims to contain.

A manifest is written last into a snapshot; a snapshot is valid only when its manifest parses and
every file it lists exists with the recorded size and checksum. It also carries the content
`digest` of the training state (independent of file layout, paths and timestamps) and the
metadata an operator needs to trust a resume: git commit, hyperparameters, dataset and torch
versions, learning rate, metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.errors import CorruptSnapshot
from storage.layout import is_safe_filename

FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "sha256"


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of a snapshot: its size in bytes and its checksum (hex)."""

    size: int
    checksum: str

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"file size must be non-negative, got {self.size}")
        if len(self.checksum) != 64 or any(c not in "0123456789abcdef" for c in self.checksum):
            raise ValueError("checksum must be 64 lowercase hex digits (sha256)")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The committed description of one snapshot."""

    run_id: str
    step: int
    epoch: int
    world_size: int
    files: Mapping[str, FileEntry]
    digest: str
    created_at: float
    metadata: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format version {self.format_version}")
        if self.checksum_algorithm != CHECKSUM_ALGORITHM:
            raise ValueError(f"unsupported checksum algorithm {self.checksum_algorithm!r}")
        if self.step < 0 or self.epoch < 0:
            raise ValueError("step and epoch must be non-negative")
        if self.world_size < 1:
            raise ValueError("world_size must be at least 1")
        if not self.files:
            raise ValueError("a manifest must list at least one file")
        for name in self.files:
            if not is_safe_filename(name):
                raise ValueError(f"unsafe file name in manifest: {name!r}")
        if not self.digest.startswith("sha256:"):
            raise ValueError("digest must look like 'sha256:<hex>'")
        if not math.isfinite(self.created_at):
            raise ValueError("created_at must be a finite unix time")

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_json(self) -> bytes:
        doc = {
            "format_version": self.format_version,
            "run_id": self.run_id,
            "step": self.step,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "digest": self.digest,
            "created_at": self.created_at,
            "checksum_algorithm": self.checksum_algorithm,
            "files": {
                n: {"size": e.size, "checksum": e.checksum} for n, e in sorted(self.files.items())
            },
            "metadata": dict(self.metadata),
        }
        return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest; any malformation is a `CorruptSnapshot`, never a crash."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("manifest is not a JSON object")
            files_doc = doc["files"]
            if not isinstance(files_doc, dict):
                raise ValueError("'files' is not an object")
            files = {
                str(n): FileEntry(size=int(e["size"]), checksum=str(e["checksum"]))
                for n, e in files_doc.items()
            }
            metadata = doc.get("metadata", {})
            if not isinstance(metadata, dict):
                raise ValueError("'metadata' is not an object")
            return cls(
                format_version=int(doc["format_version"]),
                run_id=str(doc["run_id"]),
                step=int(doc["step"]),
                epoch=int(doc["epoch"]),
                world_size=int(doc["world_size"]),
                files=files,
                digest=str(doc["digest"]),
                created_at=float(doc["created_at"]),
                checksum_algorithm=str(doc.get("checksum_algorithm", CHECKSUM_ALGORITHM)),
                metadata=metadata,
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptSnapshot(f"unreadable manifest: {exc}") from exc
