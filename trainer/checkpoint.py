"""Barrier-synchronised, rank-0 asynchronous snapshots: the facade a training script uses.

:class:`Checkpointer` ties a :class:`~trainer.state.TrainingState` to a checkpoint directory.
``resume()`` restores the chosen snapshot (:mod:`trainer.resume`). ``step_done()`` writes the
heartbeat, fires fault points, tracks the best metric (:mod:`trainer.exports`), checks for a
preemption (:mod:`trainer.preemption`) and, at the snapshot interval (steps, a duration or auto:
:mod:`contract.interval`; time-based ones agreed by all ranks), takes a snapshot: every rank
sends its per-rank state to rank 0, which copies all tensors into a reused staging arena
(parameters and optimizer state deferred to a background copy, :mod:`trainer.staging`) and hands
it to a background writer thread; the training thread never pickles tensors nor touches the disk
for a snapshot. ``finish()`` takes the final snapshot and writes ``exports/last.pt``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Mapping
from concurrent import futures
from typing import Any

import structlog
import torch
import torch.distributed as dist

from contract.documents import Heartbeat, write_document
from contract.faults import FaultInjector
from contract.interval import AUTO, Interval, auto_interval_s, parse_interval
from contract.paths import RunPaths
from contract.threads import run_in_thread
from storage import LocalSnapshotStore
from storage.blockhash import BlockHasher
from storage.content import extra_blocks, split_region, tensor_digests
from storage.layout import exports_root
from trainer import codec, preemption
from trainer.codec import TENSORS_FILE, TREE_FILE
from trainer.distributed import is_initialized, shutdown
from trainer.errors import SnapshotError, UsageError
from trainer.exports import BestPolicy, Exporter, json_metric
from trainer.journal import Journal
from trainer.placement import settle_homes
from trainer.provenance import Provenance
from trainer.resume import ResumePolicy, Resumer
from trainer.settings import STAGING_MODES, StagingMode, WorkerSettings
from trainer.sharded import ShardedSnapshots, uses_dtensors
from trainer.staging import DeferredStaging, deferrable_slots
from trainer.state import TrainingState
from trainer.writer import BackgroundWriter, Job

log = structlog.get_logger("trainer.checkpoint")


def resolve_interval(flag: Interval | None, script: int | str | Interval | None) -> Interval:
    """The snapshot interval in force: ``--checkpoint-every`` (``ORCH_CHECKPOINT_EVERY``) when
    the launch gave it, else the script's ``Checkpointer(every=...)`` when given, else auto.

    The user's flag is the intent of this launch; a script's ``every=`` is its author's default;
    with neither, ``auto`` (never "final snapshot only", which a SIGKILL would turn into losing
    the whole run).
    """
    if flag is not None:
        return flag
    if script is None:
        return AUTO
    if isinstance(script, Interval):
        return script
    try:
        return parse_interval(script, name="Checkpointer(every=...)")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class Checkpointer:
    """Snapshots and resumes a :class:`TrainingState` (see the module docstring).

    Every rank constructs one and calls ``resume()``, ``step_done()`` and ``finish()`` at the
    same points (they are collective). ``hparams`` are recorded in each manifest and compared on
    resume. ``checkpoint_dir`` and ``run_id`` default to the supervisor's ``ORCH_*`` settings.
    ``every`` is the script's snapshot interval (steps, ``0`` = final only, a duration such as
    ``"10m"``, or ``"auto"``); ``--checkpoint-every`` wins over it when given, and without
    either the interval is ``auto`` (see :func:`resolve_interval`). ``best`` (a :class:`~trainer.exports.BestPolicy`) names the
    metric passed to ``step_done`` that drives ``exports/best.pt`` and the supervisor's
    ``--keep-best``; it is recorded in every manifest. ``resume_policy``
    (:class:`~trainer.resume.ResumePolicy`) relaxes or tightens the checks on resume.
    ``staging`` (default ``ORCH_SNAPSHOT_STAGING`` or ``"deferred"``): see :mod:`trainer.staging`;
    ``"sync"`` copies everything inside ``snapshot()``, for loops that modify parameters in
    place outside ``optimizer.step()``.
    """

    def __init__(
        self,
        state: TrainingState,
        *,
        hparams: Mapping[str, Any],
        checkpoint_dir: str | None = None,
        every: int | str | Interval | None = None,
        run_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        best: BestPolicy | None = None,
        resume_policy: ResumePolicy | None = None,
        staging: StagingMode | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        self.settings = settings or WorkerSettings.from_env()
        directory = checkpoint_dir or self.settings.checkpoint_dir
        if not directory:
            raise UsageError("no checkpoint directory: pass checkpoint_dir or set ORCH_CHECKPOINT_DIR")
        interval = resolve_interval(self.settings.checkpoint_every, every)
        if best is not None and not isinstance(best, BestPolicy):
            raise UsageError(f"best must be a trainer.BestPolicy, got {type(best).__name__}")
        staging = staging or self.settings.snapshot_staging
        if staging not in STAGING_MODES:
            raise UsageError(f"staging must be 'deferred' or 'sync', got {staging!r}")
        self.state = state
        self.checkpoint_dir = os.path.abspath(directory)
        #: The snapshot interval in force (see :func:`resolve_interval`); ``every`` is its step
        #: count (0 for time-based intervals and for final-only).
        self.interval = interval
        self.every = interval.steps
        self._timed = interval.time_based
        #: Time-based intervals: when the current interval started (the attempt's first
        #: completed step, then each periodic snapshot) and whether a snapshot's cost was
        #: measured in this attempt (auto).
        self._interval_origin = -math.inf
        self._stall_measured = False
        self.run_id = run_id or self.settings.run_id or "local"
        self.provenance = Provenance(hparams, metadata=metadata, best=best)
        self.hparams = self.provenance.hparams
        self.best = best
        if is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.store = LocalSnapshotStore(self.checkpoint_dir)
        self.faults = FaultInjector.from_spec(
            self.settings.faults, rank=self.rank, attempt=self.settings.attempt
        )
        self.writer = BackgroundWriter(
            "trainer-snapshot-writer", low_priority=self.settings.snapshot_nice
        )
        self.arena = codec.StagingArena(pin_memory=torch.cuda.is_available())
        self.paths = RunPaths.of(self.checkpoint_dir)
        self.exports_dir = exports_root(self.checkpoint_dir)
        os.makedirs(self.paths.progress_dir, exist_ok=True)
        os.makedirs(self.paths.control_dir, exist_ok=True)
        self.resumer = Resumer(self, resume_policy or ResumePolicy())
        #: The determinism audit (trainer.journal): step fingerprints, compared after a resume.
        self.journal = Journal(
            self.paths, rank=self.rank, run_id=self.run_id, attempt=self.settings.attempt,
            config_hash=self.provenance.config_hash, on_divergence=self.settings.on_divergence,
            world_size=self.world_size,
        )
        self.exporter = Exporter(
            best, state=state, writer=self.writer, directory=self.exports_dir,
            run_id=self.run_id, rank=self.rank,
        )
        #: Whether this rank writes snapshots to its node's disk: global rank 0, and with
        #: ``ORCH_NODE_COPIES`` (DDP on several nodes) every node's local rank 0 whose
        #: checkpoint dir is not shared with a lower-ranked writer. Settled at the first
        #: snapshot (a collective; see :meth:`_settle_writers`).
        self.writes = self.rank == 0
        #: Whether this rank's own commit puts a complete snapshot on its node's disk (rank 0,
        #: a node copy's writer); a shard writer (FSDP) writes but rank 0 commits.
        self.commits = self.rank == 0
        self._writers: tuple[int, ...] | None = None
        #: Per rank: the writer whose directory is that rank's node's checkpoint dir (None: that
        #: node holds no copy, ``--no-node-copies``); settled with the writers.
        self.homes: tuple[int | None, ...] = (0,) * self.world_size
        #: Per rank: its local rank on its node (settled with the writers).
        self.local_ranks: tuple[int, ...] = tuple(range(self.world_size))
        self.last_snapshot_step: int | None = None
        self.resumed_from: int | None = None
        self.last_digest: str | None = None
        #: Per-component digests (``codec.component_plan`` names) of the latest snapshot this
        #: Checkpointer committed (rank 0; empty before the first): what its manifest records.
        #: Set by the writer thread when that snapshot commits, not when ``snapshot()`` returns:
        #: ``last_components_step`` names its step (set after it; ``wait()`` for the newest).
        self.last_components: dict[str, str] = {}
        self.last_components_step: int | None = None
        self._last_metrics: dict[str, Any] = {}
        self._beat_failing = False
        self._snapshot_job: Job | None = None
        self.staging: StagingMode = staging
        self._staging: DeferredStaging | None = None
        self._last_beat = -math.inf
        self._stepped = False
        #: Seconds the training thread was blocked by the latest snapshot: its synchronous part
        #: plus any wait of ``optimizer.step()`` for the deferred copy.
        self.last_stall_s = 0.0
        #: Seconds the last snapshot took to write and commit (rank 0, writer thread); None
        #: until one committed in this attempt.
        self.last_write_s: float | None = None
        # The guard: the optimizer may not change parameters or its state while they are staged.
        self._guard = state.optimizer.register_step_pre_hook(self._before_optimizer_step)
        # torchrun's teardown after a lost rank ends this one at once (trainer.preemption); a
        # snapshot already staged and being written is still committed first.
        me = weakref.ref(self)

        def drain() -> None:
            checkpointer = me()
            if checkpointer is not None:
                checkpointer._drain_for_teardown()

        preemption.on_teardown(drain)
        #: FSDP2 / DTensor models: sharded snapshots, every rank writing its own shards
        #: (trainer.sharded), which then takes snapshot(), live_digest() and the resume.
        self.sharding = ShardedSnapshots(self) if uses_dtensors(state.unwrapped_model) else None
        if self.sharding is not None:
            self.writes = True  # every rank's writer thread writes (and must be waited for)
            self.exporter.collective = True  # exports gather the full weights

    # -- resume ---------------------------------------------------------------------------

    def resume(self) -> int:
        """Restore the chosen snapshot on every rank; return the step to continue from (0: fresh).

        See :mod:`trainer.resume` for the selection across nodes, the verified load and the
        broadcast to nodes that do not hold the snapshot; a warm spare waits here first.
        """
        self._settle_staging()
        self.resumer.await_promotion()
        self._heartbeat()
        loaded = self.resumer.load()
        self.journal.begin(0 if loaded is None else loaded[0])
        if loaded is None:
            self.last_snapshot_step = None
            return 0
        step, digest = loaded
        self.resumed_from = step
        self.last_snapshot_step = step
        self.last_digest = digest
        self._heartbeat()
        return step

    # -- per step -------------------------------------------------------------------------

    def step_done(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record that ``step`` fully completed; heartbeat, keep-best and periodic snapshot."""
        if step <= self.state.step and self.state.step != 0:
            raise UsageError(f"step_done({step}) after step {self.state.step}: steps must increase")
        self.state.step = step
        if self.writes:
            self.writer.raise_if_failed()
        if metrics:
            self._last_metrics = {str(k): json_metric(v) for k, v in metrics.items()}
            self.exporter.track(step, metrics, self._last_metrics)
        # check-resume (ORCH_STOP_AT_STEP): every rank stops at the same step, snapshot committed.
        stop_here = step == self.settings.stop_at_step
        snapshot_due = stop_here or (self.every > 0 and step % self.every == 0)
        first, self._stepped = not self._stepped, True
        if first and self._timed:
            self._interval_origin = time.monotonic()
        # A heartbeat is a file write and rename (~0.3 ms): rate-limited, so that short steps
        # do not pay it every time. The supervisor's watchdog counts in seconds.
        if (
            snapshot_due
            or first
            or time.monotonic() - self._last_beat >= self.settings.heartbeat_interval_s
        ):
            self._heartbeat()
        self.faults.point("step_end", step)
        agreement: preemption.Agreement | None = None
        if step % self.settings.preempt_check_every == 0:
            # One all-reduce per step: the preemption check, and the time-based interval's vote
            # (each rank's clock) so that every rank snapshots at the same step.
            agreement = preemption.agreed(self, snapshot_due=self._timed and self._interval_elapsed())
            if agreement.snapshot and not snapshot_due:
                snapshot_due = True
                self._heartbeat()
        if snapshot_due:
            started = time.monotonic()
            self.snapshot()
            self._interval_origin, self._stall_measured = started, True
        elif self.writes and self._snapshot_job is None:
            self._reserve_arena()
        # After the snapshot: its component digests (when the checkpointer has them) go with
        # this step's fingerprint; a divergence with --on-divergence fail raises here.
        self.journal.record(
            step,
            metrics,
            # Only this step's own: the writer sets them when the snapshot commits, usually
            # after this call, and an older snapshot's would be compared against this step.
            self.last_components if snapshot_due and self.last_components_step == step else None,
        )
        if agreement is not None and agreement.preempt:
            preemption.stop(self, step, heartbeat=self._heartbeat)
        if stop_here:
            self._stop_at(step)

    def _stop_at(self, step: int) -> None:
        """``ORCH_STOP_AT_STEP``: the snapshot of ``step`` is committed; end the process, exit 0.

        Any script ends there as if it had finished; nothing after the loop runs (check-resume
        compares snapshots only).
        """
        self.close()  # rank 0: the snapshot is committed (or its error raised)
        if is_initialized() and self.world_size > 1:
            dist.barrier()  # no rank leaves before rank 0 committed
        log.info("checkpoint.stopped_at_step", step=step, digest=self.last_digest)
        shutdown()
        # Straight out, as trainer.run ends a failed rank: interpreter finalisation with a DDP
        # reducer and gloo threads still alive aborted about one stop in 25 here ("terminate
        # called without an active exception", SIGABRT), which failed the check's run. The
        # snapshot is committed and every rank passed the barrier; nothing else is owed.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)

    def _interval_elapsed(self) -> bool:
        """This rank's vote for a time-based snapshot at this step (its own clock).

        ``auto``: rank 0 alone votes, from the stall it measured (the other ranks do not see
        the staging and would under-measure); before a snapshot was measured in this attempt,
        the first interval (:data:`~contract.interval.AUTO_MIN_INTERVAL_S`, capped).
        """
        if self.interval.kind == "seconds":
            limit = self.interval.value
        elif self.rank != 0:
            return False
        else:
            limit = auto_interval_s(
                self.last_stall_s if self._stall_measured else None,
                self.settings.max_snapshot_interval_s,
            )
        return time.monotonic() - self._interval_origin >= limit

    def _heartbeat(self) -> None:
        self._last_beat = time.monotonic()
        beat = Heartbeat(
            rank=self.rank,
            step=self.state.step,
            attempt=self.settings.attempt,
            time=time.time(),
            resumed_from=self.resumed_from,
            epoch=self.state.epoch,
            pid=os.getpid(),
            snapshot_stall_s=self.last_stall_s if self.writes and self.last_write_s else None,
            snapshot_write_s=self.last_write_s if self.writes else None,
        )
        try:
            write_document(self.paths.heartbeat(self.rank), beat, durable=False)
        except OSError as exc:
            # A full or read-only disk: training goes on, and the next snapshot (which needs
            # the disk) fails with the clear DiskFull/NotWritable error instead of a heartbeat.
            if not self._beat_failing:
                log.warning("heartbeat.write_failed", rank=self.rank, error=str(exc))
            self._beat_failing = True
        else:
            self._beat_failing = False

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Take a snapshot of the current step (collective: every rank must call it)."""
        if self.sharding is not None:
            return self.sharding.snapshot()
        step = self.state.step
        started = time.perf_counter()
        self._settle_staging()
        writers = self._settle_writers()
        gathered = self._gather_rank_states(everywhere=len(writers) > 1)
        self.last_snapshot_step = step
        if not self.writes:
            return
        if gathered is None:
            raise SnapshotError(f"rank {self.rank} received no per-rank states")
        steps = [int(g["step"]) for g in gathered]
        if any(s != step for s in steps):
            raise SnapshotError(f"ranks reached different steps at snapshot time: {steps}")
        gathered_at = time.perf_counter()
        if self._snapshot_job is not None:
            # The arena is reused: the previous snapshot must be on disk before it is overwritten.
            self._snapshot_job.wait()
        self.writer.raise_if_failed()
        waited = time.perf_counter() - gathered_at
        encoded = codec.encode(self.state.snapshot_object(gathered))
        deferred = (
            deferrable_slots(encoded, [self.state.optimizer]) if self.staging == "deferred" else frozenset()
        )
        arena = self.arena.stage(encoded, skip=deferred)
        staging: DeferredStaging | None = None
        if deferred:
            staging = DeferredStaging(self.arena, encoded, deferred)
            staging.start()
            self._staging = staging
        else:
            encoded.sources = []  # the writer needs only the arena; drop references to live tensors
        stall = time.perf_counter() - started
        self.last_stall_s = stall
        log.info(
            "snapshot.staged",
            step=step,
            stall_s=round(stall, 6),
            gather_s=round(gathered_at - started, 6),
            wait_s=round(waited, 6),
            bytes=encoded.arena_nbytes,
            deferred_bytes=0 if staging is None else staging.nbytes,
        )
        self.faults.point("after_staging", step)
        metadata = self.provenance.manifest_metadata(
            self.state, self._last_metrics, attempt=self.settings.attempt
        )
        epoch = self.state.epoch

        def job() -> None:
            if staging is not None:
                staging.wait()
            self._write_snapshot(step, epoch, encoded, arena, metadata)

        self._snapshot_job = self.writer.submit(job, label=f"snapshot@{step}")

    def _drain_for_teardown(self) -> None:
        """Let the snapshot in flight (its state complete in the arena) reach its commit."""
        job = self._snapshot_job
        if job is None or job.done.is_set():
            return
        started = time.perf_counter()
        job.wait()
        log.warning("snapshot.drained_on_teardown", label=job.label,
                    seconds=round(time.perf_counter() - started, 4))

    def _before_optimizer_step(self, *_args: Any) -> None:
        """Optimizer step pre-hook: parameters may change only once they are staged."""
        self._settle_staging()

    def _settle_staging(self) -> None:
        """Wait for a deferred copy in flight (training thread); count the wait as stall."""
        staging, self._staging = self._staging, None
        if staging is not None:
            waited = staging.wait()
            self.last_stall_s += waited
            if waited > 0.001:
                log.debug("snapshot.staging_waited", seconds=round(waited, 6))

    def _reserve_arena(self) -> None:
        """Allocate the staging arena in the background before the first snapshot needs it."""
        if self.sharding is not None:
            return  # its buffers are sized by each rank's shards at the first snapshot
        encoded = codec.encode(self.state.snapshot_object([self.state.rank_state_dict()] * self.world_size))
        encoded.sources = []
        arena = self.arena
        self._snapshot_job = self.writer.submit(lambda: arena.reserve(encoded), label="reserve")

    def _gather_rank_states(self, *, everywhere: bool = False) -> list[dict[str, Any]] | None:
        """Every rank's per-rank state, on rank 0 (None elsewhere), or on every rank."""
        rank_state = self.state.rank_state_dict()
        if not (is_initialized() and self.world_size > 1):
            return [rank_state]
        if everywhere:
            # Node copies: each writing node needs the whole list (a few KB per rank).
            every: list[Any] = [None] * self.world_size
            dist.all_gather_object(every, rank_state)
            return every
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(rank_state, gathered, dst=0)
        return gathered

    def _settle_writers(self) -> tuple[int, ...]:
        """The ranks that write snapshots (collective, once per Checkpointer; see ``writes``).

        With node copies, each node's local rank 0 drops a probe file into its checkpoint dir
        and, after everyone did, looks for the others' probes: a dir shared between nodes (NFS)
        shows several, and only the lowest of those ranks writes there, so two processes never
        commit the same step into one directory. Also settles :attr:`homes`: for every rank, the
        writer whose directory is its node's checkpoint dir (None: its node holds no copy), which
        a sharded snapshot needs to place every rank's shard file in every copy.
        """
        if self._writers is not None:
            return self._writers
        settings = self.settings
        multinode = settings.local_world_size < self.world_size
        if not (is_initialized() and multinode):
            self._writers, self.homes = (0,), (0,) * self.world_size
            self.local_ranks = tuple(range(self.world_size))
            self._settle_roles()
            return self._writers
        copies = settings.node_copies
        probes = os.path.join(self.paths.run_dir, "copy-probes")
        mine = os.path.join(probes, f"{settings.launch_token or 'probe'}-{self.rank}")
        if copies and settings.local_rank == 0:
            os.makedirs(probes, exist_ok=True)
            with open(mine, "w"):
                pass
        if copies:
            dist.barrier()
        prefix = f"{settings.launch_token or 'probe'}-"
        shared_with: list[int] = []
        if copies and settings.local_rank == 0:
            for name in os.listdir(probes):
                if name.startswith(prefix) and name[len(prefix):].isdigit():
                    shared_with.append(int(name[len(prefix):]))
        # (node, local rank, the writer of this node's dir when it is a node leader)
        owner = min(shared_with, default=self.rank) if settings.local_rank == 0 else None
        decisions: list[Any] = [None] * self.world_size
        dist.all_gather_object(decisions, (settings.group_rank, settings.local_rank, owner))
        if copies and settings.local_rank == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mine)
        self.local_ranks = tuple(int(lr) for _n, lr, _o in decisions)
        self._writers, self.homes = settle_homes(
            [(int(n), int(lr)) for n, lr, _o in decisions],
            {int(n): int(o) for n, lr, o in decisions if o is not None} if copies else None,
        )
        self._settle_roles()
        if self.rank == 0:
            log.info("snapshot.node_copies", writers=list(self._writers))
        return self._writers

    def _settle_roles(self) -> None:
        """``commits``: this rank commits a copy on its node (one of the writers); ``writes``:
        it writes snapshot files at all, which every rank of a sharded snapshot does."""
        self.commits = self._writers is not None and self.rank in self._writers
        self.writes = self.commits or self.sharding is not None

    def live_digest(self) -> str | None:
        """Digest a snapshot taken now would record (collective; the value on rank 0, else None).

        For correctness gates: compare it with the manifest digest of another run.
        """
        if self.sharding is not None:
            return self.sharding.live_digest()
        gathered = self._gather_rank_states()
        if gathered is None:
            return None
        return codec.state_digest(self.state.snapshot_object(gathered))

    def _write_snapshot(
        self,
        step: int,
        epoch: int,
        encoded: codec.EncodedState,
        arena: torch.Tensor,
        metadata: dict[str, Any],
    ) -> None:
        started = time.perf_counter()
        writer = self.store.begin(step, on_phase=lambda phase: self.faults.point(phase, step))
        try:
            size = encoded.arena_nbytes
            view = arena.numpy().data if size else memoryview(b"")
            # Every byte is hashed once: the file checksum's 64 KiB block hashes are the large
            # tensors' (block-aligned in the arena); the bytes they do not cover (small
            # tensors, last partial blocks) are hashed beside the write, then the content and
            # component digests are made of tensor digests (storage.content, format v2).
            splits = [split_region(slot.offset, slot.nbytes) for slot in encoded.slots]
            extras = run_in_thread(lambda: extra_blocks(view, splits), name="trainer-digest")
            try:
                with writer.open(TENSORS_FILE, direct=True) as f:
                    # One call: the file chunks it, hashing each chunk beside its write.
                    f.write(view)
            finally:
                futures.wait([extras])  # it reads the arena: never abort under it
            if not isinstance(f.hasher, BlockHasher):
                raise TypeError("the snapshot file was not hashed by blocks")
            digest, components = codec.digests_of(
                encoded.canonical_tree_bytes(),
                codec.component_plan(encoded.root),
                tensor_digests(splits, f.hasher.blocks(), extras.result()),
            )
            writer.write_bytes(TREE_FILE, encoded.tree_bytes())
            manifest = writer.commit(
                run_id=self.run_id,
                epoch=epoch,
                world_size=self.world_size,
                digest=digest,
                metadata=metadata,
                components=components,
            )
        except BaseException:
            writer.abort()
            raise
        self.last_digest = digest
        self.last_components = components
        self.last_components_step = step
        seconds = time.perf_counter() - started
        self.last_write_s = seconds  # the writer thread's; read by the next heartbeat
        log.info(
            "snapshot.committed",
            step=step,
            bytes=manifest.total_bytes,
            seconds=round(seconds, 4),
            digest=digest,
        )
        self.faults.point("after_commit", step)

    # -- end of run -----------------------------------------------------------------------

    def wait(self) -> None:
        """Block until background writes finished; re-raise the first one that failed."""
        self._settle_staging()
        self.writer.wait()

    def finish(self) -> None:
        """Final snapshot (unless one exists at this step), wait for writes, export last.pt."""
        step = self.state.step
        self._heartbeat()
        if self.last_snapshot_step != step:
            self.snapshot()
        if self.writes:
            self.writer.wait()
        if self.rank == 0 or self.exporter.collective:
            # Sharded: every rank takes part in gathering the full weights; rank 0 writes.
            self.exporter.export_last(step, self._last_metrics, self.last_digest)
        if self.writes:
            self.writer.close()
        if is_initialized() and self.world_size > 1:
            dist.barrier()
        self.journal.close()
        log.info("run.finished", step=step, digest=self.last_digest)

    def close(self) -> None:
        """Wait for pending writes, stop the writer thread, remove the optimizer hook.

        Re-raises a pending error.
        """
        self._guard.remove()
        self._settle_staging()
        self.writer.close()
