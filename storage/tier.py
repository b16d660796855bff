"""What a snapshot tier is, as its consumers see it: the records and the protocols storage owns.

Both tiers (:class:`storage.local.LocalSnapshotStore` on a node's disk and
:class:`storage.remote.RemoteSnapshotStore` in an object store) list, validate and delete
committed snapshots the same way and describe each one with a :class:`SnapshotInfo`; that common
part is :class:`SnapshotTier`. Consumers that need more type against the small extensions here
(:class:`LocalTier` for the supervisor's cleanup, :class:`RemoteTier` for the mirror's transfers)
instead of declaring their own copies, so a change of a tier's signature fails type checking at
every use.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from storage.manifest import Manifest

if TYPE_CHECKING:  # a type only: storage.local imports this module
    from storage.local import LocalSnapshotStore
    from storage.objectstore.common import Pacing

TransferProgress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as a transfer advances."""


@dataclass(frozen=True, kw_only=True)
class SnapshotInfo:
    """What is known about one committed snapshot on a tier.

    `valid` is None when only listed (not checked), True/False after validation; `reason`
    explains a False.
    """

    step: int
    path: str
    tier: str
    manifest: Manifest | None
    valid: bool | None
    reason: str | None = None
    #: Invalid because a newer release wrote it (:class:`storage.errors.NewerSnapshotFormat`):
    #: skipped like an invalid snapshot but never deleted.
    newer_format: bool = False

    @property
    def digest(self) -> str | None:
        return self.manifest.digest if self.manifest else None

    @property
    def bytes(self) -> int | None:
        return self.manifest.total_bytes if self.manifest else None

    @property
    def created_at(self) -> float | None:
        return self.manifest.created_at if self.manifest else None

    def to_json(self) -> dict[str, Any]:
        """The `snapshots --json` record (stable field names: tools rely on them)."""
        return {
            "step": self.step,
            "tier": self.tier,
            "valid": self.valid,
            "reason": self.reason,
            "digest": self.digest,
            "bytes": self.bytes,
            "created_at": self.created_at,
            "path": self.path,
            "epoch": self.manifest.epoch if self.manifest else None,
            "run_id": self.manifest.run_id if self.manifest else None,
            # Which world size wrote it: a resume on another one needs --allow-world-size-change.
            "world_size": self.manifest.world_size if self.manifest else None,
            # Snapshot format (1: plain sha256 checksums; 2: block checksums, current); a
            # newer release's snapshot is invalid here with newer_format true, and kept.
            "format_version": self.manifest.format_version if self.manifest else None,
            "newer_format": self.newer_format,
            "metrics": dict(self.manifest.metadata.get("metrics") or {}) if self.manifest else {},
        }


@dataclass(frozen=True, kw_only=True)
class UploadResult:
    """One upload: `skipped` when the same snapshot (same digest) was already remote."""

    step: int
    bytes: int
    seconds: float
    skipped: bool


class SnapshotTier(Protocol):
    """The part every tier offers: list, validate and delete committed snapshots."""

    def list(self) -> builtins.list[SnapshotInfo]:
        """Committed snapshots, oldest first by step; files unchecked (``valid`` None or False)."""
        ...

    def validate(self, step: int, *, verify_checksums: bool = True) -> SnapshotInfo:
        """The snapshot at ``step`` with ``valid`` (and, when False, ``reason``) filled in."""
        ...

    def delete(self, step: int) -> None:
        """Remove the committed snapshot at ``step``; it disappears at once, then is freed."""
        ...


class LocalTier(SnapshotTier, Protocol):
    """A tier on a disk the caller owns: it also removes what dead writers left behind."""

    def cleanup_abandoned(self) -> Sequence[str]:
        """Remove temporary dirs of dead writers (only when no writer runs); their paths."""
        ...


class RemoteTier(SnapshotTier, Protocol):
    """The remote tier as the mirror uses it: transfers to and from a local tier, run state."""

    def upload(
        self,
        local_store: LocalSnapshotStore,
        step: int,
        progress: TransferProgress | None = None,
        on_phase: Callable[[str], None] | None = None,
        pacing: Pacing | None = None,
    ) -> UploadResult:
        """Upload one committed local snapshot (data first, manifest last); idempotent.

        ``on_phase`` is called at the ``mirror_*`` fault-injection points; ``pacing`` sets the
        upload's thread priority and bandwidth (:class:`storage.objectstore.common.Pacing`).
        """
        ...

    def download(
        self,
        step: int,
        local_store: LocalSnapshotStore,
        progress: TransferProgress | None = None,
    ) -> SnapshotInfo:
        """Download, verify and commit the remote snapshot at ``step`` into ``local_store``."""
        ...

    def put_state(self, node_rank: int, doc: Mapping[str, Any]) -> None:
        """Store one node's run state under ``<prefix>/run/node-<R>/state.json``."""
        ...

    def get_state(self) -> builtins.list[dict[str, Any]]:
        """Every node's mirrored run state, by node rank."""
        ...

    def abort_incomplete_uploads(self, *, older_than_s: float = 0.0) -> int:
        """Abort multipart uploads left under the prefix: this process's own failed ones (whatever
        their age) and those started ``older_than_s`` ago; how many. No retry inside."""
        ...

    def preflight(self) -> None:
        """Write, read and delete a probe object under the prefix (bounded by timeouts)."""
        ...


__all__ = [
    "LocalTier",
    "RemoteTier",
    "SnapshotInfo",
    "SnapshotTier",
    "TransferProgress",
    "UploadResult",
]
