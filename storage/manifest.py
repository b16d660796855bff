"""The snapshot manifest: what a snapshot claims to contain.

A manifest is written last into a snapshot; a snapshot is valid only when its manifest parses and
every file it lists exists with the recorded size and checksum. It also carries the content
`digest` of the training state (independent of file layout, paths and timestamps), the
per-component digests (`components`: name -> digest, e.g. `"model"`, `"rng/python/rank0"`; named
and computed by `trainer.codec`, opaque here) and the metadata an operator needs to trust a
resume: git commit, hyperparameters, dataset and torch versions, learning rate, metrics.
Manifests written before `components` existed load with an empty mapping.

Two format versions are read: version 1 records each file's plain sha256 (`"sha256"`), version 2
(written now) the sha256 of its 64 KiB block hashes (`"sha256-b64k"`, :mod:`storage.blockhash`),
which lets the writer hash every byte once. Each :class:`FileEntry` carries its manifest's
algorithm, so a verifier asks the entry for its hasher and never needs the version.

Every file name a manifest lists is a plain name inside its snapshot
(:func:`storage.layout.is_safe_filename`: no separator, no ``..``, not absolute, no NUL, not
hidden); a manifest naming anything else, local or downloaded, is unreadable
(``CorruptSnapshot``), so no path is ever built from such a name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.blockhash import SHA256, SHA256_BLOCKS, FileHasher, new_hasher
from storage.errors import CorruptSnapshot, NewerSnapshotFormat
from storage.layout import is_safe_filename

#: The version the snapshot writer writes.
FORMAT_VERSION = 2
#: Every version this code reads, with the checksum algorithm its manifests use.
CHECKSUM_ALGORITHMS: Mapping[int, str] = {1: SHA256, 2: SHA256_BLOCKS}
#: The algorithm of :data:`FORMAT_VERSION`.
CHECKSUM_ALGORITHM = CHECKSUM_ALGORITHMS[FORMAT_VERSION]
#: Longest component name accepted in a manifest.
MAX_COMPONENT_NAME = 1024
_HEX = frozenset("0123456789abcdef")


def is_content_digest(value: object) -> bool:
    """True for ``"sha256:"`` followed by 64 lowercase hex digits (a component digest)."""
    return (
        isinstance(value, str)
        and value.startswith("sha256:")
        and len(value) == 7 + 64
        and _HEX.issuperset(value[7:])
    )


def is_component_name(name: object) -> bool:
    """True for a non-empty name of at most MAX_COMPONENT_NAME printable characters."""
    return isinstance(name, str) and 0 < len(name) <= MAX_COMPONENT_NAME and name.isprintable()


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of a snapshot: its size in bytes and its checksum (hex) by ``algorithm``."""

    size: int
    checksum: str
    #: How ``checksum`` was computed (the manifest's ``checksum_algorithm``).
    algorithm: str = CHECKSUM_ALGORITHM

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"file size must be non-negative, got {self.size}")
        if len(self.checksum) != 64 or any(c not in "0123456789abcdef" for c in self.checksum):
            raise ValueError("checksum must be 64 lowercase hex digits (sha256)")
        if self.algorithm not in CHECKSUM_ALGORITHMS.values():
            raise ValueError(f"unknown checksum algorithm {self.algorithm!r}")

    def hasher(self) -> FileHasher:
        """A fresh hasher whose ``hexdigest()`` must equal :attr:`checksum` after the file."""
        return new_hasher(self.algorithm)


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
    #: Per-component content digests, name -> ``"sha256:<hex>"`` (empty in older manifests).
    components: Mapping[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    def __post_init__(self) -> None:
        if self.format_version not in CHECKSUM_ALGORITHMS:
            raise ValueError(f"unsupported manifest format version {self.format_version}")
        if self.checksum_algorithm != CHECKSUM_ALGORITHMS[self.format_version]:
            raise ValueError(
                f"checksum algorithm {self.checksum_algorithm!r} does not belong to manifest "
                f"format version {self.format_version}"[:200]
            )
        if self.step < 0 or self.epoch < 0:
            raise ValueError("step and epoch must be non-negative")
        if self.world_size < 1:
            raise ValueError("world_size must be at least 1")
        if not self.files:
            raise ValueError("a manifest must list at least one file")
        for name, entry in self.files.items():
            if not is_safe_filename(name):
                raise ValueError(f"unsafe file name in manifest: {name!r}")
            if entry.algorithm != self.checksum_algorithm:
                raise ValueError(
                    f"{name!r}: checksum by {entry.algorithm!r} in a manifest of "
                    f"{self.checksum_algorithm!r}"[:200]
                )
        if not self.digest.startswith("sha256:"):
            raise ValueError("digest must look like 'sha256:<hex>'")
        if not math.isfinite(self.created_at):
            raise ValueError("created_at must be a finite unix time")
        for name, value in self.components.items():
            if not is_component_name(name):
                raise ValueError(f"bad component name in manifest: {name!r}"[:200])
            if not is_content_digest(value):
                raise ValueError(f"component {name!r} digest must be 'sha256:' + 64 hex digits"[:200])

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
        if self.components:
            # Only when there are any: a manifest without components (written by a caller that
            # has none) keeps the bytes it had before the field existed.
            doc["components"] = dict(self.components)
        return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest; any malformation is a `CorruptSnapshot`, never a crash.

        Types are checked, not coerced (a string step or a boolean size is corruption), and
        non-finite numbers (`NaN`, `Infinity`, which Python's json accepts) are rejected
        anywhere in the document, so an accepted manifest can always be written back out.
        """
        try:
            doc = json.loads(data, parse_constant=_reject_constant)
            if not isinstance(doc, dict):
                raise ValueError("manifest is not a JSON object")
            version = _int(doc, "format_version")
            if version > max(CHECKSUM_ALGORITHMS):
                raise NewerSnapshotFormat(
                    f"manifest format version {version} is newer than this version reads "
                    f"({max(CHECKSUM_ALGORITHMS)}): written by a newer release; left in place"
                )
            checksum_algorithm = doc.get("checksum_algorithm", CHECKSUM_ALGORITHMS.get(version))
            if not isinstance(checksum_algorithm, str):
                raise ValueError(f"'checksum_algorithm' is not a known name: {checksum_algorithm!r}")
            files_doc = doc["files"]
            if not isinstance(files_doc, dict):
                raise ValueError("'files' is not an object")
            files = {}
            for n, e in files_doc.items():
                if not isinstance(e, dict):
                    raise ValueError(f"file entry {n!r} is not an object")
                files[n] = FileEntry(
                    size=_int(e, "size"), checksum=_str(e, "checksum"), algorithm=checksum_algorithm
                )
            metadata = doc.get("metadata", {})
            if not isinstance(metadata, dict):
                raise ValueError("'metadata' is not an object")
            created_at = doc["created_at"]
            if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
                raise ValueError("'created_at' is not a number")
            components = doc.get("components", {})
            if not isinstance(components, dict):
                raise ValueError("'components' is not an object")
            return cls(
                format_version=version,
                run_id=_str(doc, "run_id"),
                step=_int(doc, "step"),
                epoch=_int(doc, "epoch"),
                world_size=_int(doc, "world_size"),
                files=files,
                digest=_str(doc, "digest"),
                created_at=float(created_at),
                checksum_algorithm=checksum_algorithm,
                metadata=metadata,
                components=components,
            )
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            # UnicodeDecodeError and json.JSONDecodeError are ValueErrors; RecursionError comes
            # from absurdly deep nesting.
            raise CorruptSnapshot(f"unreadable manifest: {exc!r}"[:500]) from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in manifest")


def _int(doc: Mapping[str, Any], key: str) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key!r} is not an integer: {value!r}"[:200])
    return value


def _str(doc: Mapping[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is not a string: {value!r}"[:200])
    return value
