"""The supervisor's snapshot bookkeeping: resume selection, scans, verification and retention.

One collaborator of :class:`~orchestrator.supervisor.Supervisor` owns what the supervisor knows
about the node's snapshots: which ones it has checksum-verified, whether the next selection
must verify everything, the newest local step, which steps reached the mirror. It picks the
newest valid snapshot across tiers (removing invalid ones, each a ``supervisor.snapshot_invalid``
event), scans the local tier on the supervisor's schedule (feeding the mirror, re-planning
retention when something changed) and applies retention without ever deleting the last verified
snapshot, the one the running ranks resumed from, or one not yet mirrored.
"""

from __future__ import annotations

from dataclasses import replace

from orchestrator.config import LaunchConfig
from orchestrator.mirror import Mirror, pending_of
from orchestrator.restore import ProgressFactory, restore_newer
from orchestrator.runstate import EventLog
from orchestrator.settings import Settings
from storage import LocalTier, RetentionPolicy, SnapshotInfo, plan_retention
from storage.errors import StorageError
from storage.retention import best_ranking


class SnapshotBook:
    """What the supervisor knows about the snapshots; see the module docstring."""

    def __init__(
        self,
        *,
        config: LaunchConfig,
        settings: Settings,
        store: LocalTier,
        events: EventLog,
        mirror: Mirror | None,
        progress: ProgressFactory | None,
    ) -> None:
        self._config = config
        self._settings = settings
        self._store = store
        self._events = events
        self._mirror = mirror
        self._progress = progress
        self._retention = RetentionPolicy(
            keep_last=config.keep_local,
            keep_every=config.keep_every,
            # Ranked by the metric the script declares in every manifest (never a flag).
            keep_best=config.keep_best,
        )
        #: Steps checksum-verified by this supervisor (retention keeps the newest of them).
        self._verified: set[int] = set()
        #: Whether the next selection checksums the local snapshots (see select_resume).
        self.verify_next = True
        #: Whether the running attempt's resume point was checksum-verified before launch.
        self.resume_verified = False
        #: ``retention.best_undeclared`` was reported (once per launch).
        self._undeclared_reported = False
        #: Usable local steps at the last scan, oldest first.
        self.local_steps: tuple[int, ...] = ()
        self.newest_local: int | None = None
        self._known_steps: tuple[int, ...] | None = None
        self._known_mirrored: frozenset[int] = frozenset()

    def cleanup_abandoned(self, attempt: int) -> None:
        """Remove the temporary dirs of dead writers (``supervisor.abandoned_removed``)."""
        removed = list(self._store.cleanup_abandoned())
        if removed:
            self._events.emit("supervisor.abandoned_removed", attempt=attempt, paths=removed)

    def select_resume(self, attempt: int) -> int | None:
        """The newest valid snapshot; invalid ones are removed.

        Equivalent to ``store.newest_valid(verify_checksums=..., cleanup=True)``, spelled out
        so that every rejected snapshot becomes a ``supervisor.snapshot_invalid`` event.

        The first attempt of a launch (and the one after ranks reported a snapshot that failed
        its checksum) checksums every candidate. A relaunch within the launch checks manifests
        and sizes only: the snapshots it chooses from were written under this supervisor's
        watch, and the ranks verify every byte while they load anyway, so a second full pass
        here would only delay the resume (about 1.4 s per GB). Should the ranks find damage,
        they fail with ``CorruptSnapshot`` and the policy sets :attr:`verify_next`.
        """
        verify, self.verify_next = self.verify_next, False
        self.resume_verified = verify
        local = self._newest_valid_local(attempt, verify)
        if self._mirror is None:
            return local
        # Across tiers: a newer remote snapshot (or any, when no valid local one exists) is
        # downloaded, verified and committed locally; a corrupt one falls back to the next.
        remote = restore_newer(
            remote=self._mirror.remote,
            local=self._mirror.local_store,
            newer_than=local,
            events=self._events,
            settings=self._settings,
            attempt=attempt,
            progress=self._progress,
        )
        if remote is None:
            return local
        self._verified = {remote}
        return remote

    def _newest_valid_local(self, attempt: int, verify: bool) -> int | None:
        for info in reversed(self._store.list()):
            checked = self._store.validate(info.step, verify_checksums=verify)
            if checked.valid:
                if verify:
                    self._verified = {checked.step}
                return checked.step
            self._events.emit(
                "supervisor.snapshot_invalid",
                attempt=attempt,
                step=info.step,
                reason=checked.reason,
                path=info.path,
            )
            if not checked.newer_format:  # a newer release's snapshot stays for that release
                self._store.delete(info.step)
        return None

    def scan(self, *, protect: int | None) -> None:
        """List the local tier: newest step, mirror notification, retention if anything changed.

        ``protect``: the snapshot the running ranks resumed from (they may still be reading it).
        """
        infos = self._store.list()
        usable = [i.step for i in infos if i.valid is not False]
        self.newest_local = max(usable) if usable else None
        self.local_steps = tuple(usable)
        mirrored_changed = False
        if self._mirror is not None:
            self._mirror.check()  # a crashed mirror thread never goes unnoticed
            self._mirror.notify(usable)
            mirrored = self._mirror.mirrored_steps() & frozenset(usable)
            mirrored_changed = mirrored != self._known_mirrored
            self._known_mirrored = mirrored
        steps = tuple(i.step for i in infos)
        if steps != self._known_steps or mirrored_changed:
            self._known_steps = steps
            self._apply_retention(infos, protect)

    def replan(self) -> None:
        """Re-plan retention at the next scan even if no snapshot appeared (after an attempt:
        its resume point is no longer protected)."""
        self._known_steps = None

    def note_loaded(self, step: int) -> None:
        """The ranks resumed from ``step`` and trained past it: they checksummed every byte of
        it while loading (a damaged one fails the load), so retention may count it as the
        verified fallback it never deletes. Nothing is checksummed here: a pass over the newest
        snapshot at every attempt's end would add about 1.4 s per GB to every recovery."""
        self._verified.add(step)

    def verify_final(self) -> None:
        """The run finished: checksum its newest snapshot once, so that retention keeps exactly
        the last K instead of an older verified fallback beside them. Off every recovery's
        path (about 1.4 s per GB, paid once at the end, only with retention on)."""
        if not self._config.retention_active:
            return
        for info in reversed(self._store.list()):
            if info.step in self._verified:
                return
            if info.valid is not False and self._store.validate(info.step).valid:
                self._verified.add(info.step)
                return
            # Damaged: the older verified fallback stays; the next launch checksums them all.

    def _apply_retention(self, infos: list[SnapshotInfo], protect: int | None) -> None:
        if not self._config.retention_active or not infos:
            return
        infos = [
            replace(i, valid=True) if i.valid is None and i.step in self._verified else i
            for i in infos
        ]
        if self._retention.keep_best and not self._undeclared_reported:
            usable = [i for i in infos if i.valid is not False]
            if usable and best_ranking(usable, self._retention) is None:
                # --keep-best ranks by the metric the script declares in its manifests; none
                # does, so the rule keeps nothing: say so instead of pruning in silence.
                self._undeclared_reported = True
                self._events.emit(
                    "retention.best_undeclared",
                    keep_best=self._retention.keep_best,
                    hint="declare it in the script: Checkpointer(best=BestPolicy(metric=...))",
                )
        protected: set[int] = set() if protect is None else {protect}
        if self._mirror is not None:
            # Never delete a local snapshot that has not reached the object store yet.
            protected.update(pending_of(self.local_steps, self._mirror.mirrored_steps()))
        doomed = plan_retention(infos, self._retention, protected=protected)
        deleted: list[int] = []
        for step in doomed:
            try:
                self._store.delete(step)
            except (StorageError, OSError) as exc:
                self._events.emit("retention.failed", step=step, error=str(exc))
                continue
            deleted.append(step)
        if deleted:
            self._events.emit("retention.deleted", steps=deleted, tier="local")
            self._known_steps = tuple(i.step for i in self._store.list())
