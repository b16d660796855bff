"""Barrier-synchronised, rank-0 asynchronous snapshots and verified, bit-exact resume.

:class:`Checkpointer` ties a :class:`~trainer.state.TrainingState` to a checkpoint directory.
``resume()`` selects a snapshot (the supervisor's ``ORCH_RESUME_STEP``, or the newest valid one
picked by rank 0 and broadcast), checks its hyperparameters and world size, reads its files with
checksum verification and restores the shared state plus each rank's own RNGs and loader
position. ``step_done()`` writes the heartbeat, fires fault points, tracks the best metric and,
every ``every`` steps, takes a snapshot: every rank sends its per-rank state to rank 0, which
copies all tensors into a reused staging arena and hands it to a background writer thread; the
training thread never pickles tensors nor touches the disk for a snapshot. ``finish()`` takes the
final snapshot and writes the weights-only export ``exports/last.pt``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import structlog
import torch
import torch.distributed as dist

from contract.atomic import atomic_write_json, fsync_dir
from contract.documents import Heartbeat, PreemptAck, SpareGate, read_document, write_document
from contract.faults import FaultInjector
from contract.paths import RunPaths
from storage import LocalSnapshotStore, Manifest
from storage.errors import CorruptSnapshot
from storage.layout import exports_root
from trainer import codec, preemption
from trainer.distributed import is_initialized
from trainer.errors import (
    ConfigMismatch,
    Preempted,
    ResumeError,
    SnapshotError,
    TrainerError,
    UsageError,
    WorldSizeMismatch,
)
from trainer.settings import WorkerSettings
from trainer.staging import DeferredStaging, deferrable_slots
from trainer.state import TrainingState
from trainer.writer import BackgroundWriter, Job

log = structlog.get_logger("trainer.checkpoint")

TENSORS_FILE = "tensors.bin"
TREE_FILE = "tree.json"
_ABSENT = "<absent>"


class PeerFailure(TrainerError):
    """Another rank failed during a collective step (resume); carries that rank's fatality."""

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


def normalize_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as canonical JSON values (tuples become lists); UsageError if not JSON-able."""
    try:
        text = json.dumps(dict(hparams), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"hparams must be JSON-serialisable with finite floats: {exc}") from exc
    value: dict[str, Any] = json.loads(text)
    return value


def config_hash(hparams: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``hparams``."""
    text = json.dumps(normalize_hparams(hparams), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def diff_hparams(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ, mapped to ``(saved, current)`` (``"<absent>"`` when missing)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        if a != b or type(a) is not type(b):
            out[key] = (a, b)
    return out


def _json_metric(value: Any) -> Any:
    if isinstance(value, torch.Tensor | np.generic):
        value = value.item()
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def git_commit(directory: str) -> str | None:
    """``git rev-parse HEAD`` in ``directory``; None when not a repository or git is missing."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and commit else None


def write_weights_export(
    directory: str, name: str, tensors: dict[str, torch.Tensor], sidecar: dict[str, Any]
) -> str:
    """Write ``<name>.pt`` (torch.save of a flat tensor dict) and ``<name>.json`` durably.

    The ``.pt`` file goes to a temporary name, is fsynced and renamed; its sha256 goes into the
    sidecar, written the same way afterwards. Load it with ``torch.load(..., weights_only=True)``.
    """
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"{name}.pt")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.pt.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    doc = dict(sidecar, sha256=h.hexdigest(), file=f"{name}.pt", time=time.time())
    atomic_write_json(os.path.join(directory, f"{name}.json"), doc, durable=True)
    return final


#: Parts of a snapshot decoded as views into the read buffer (see Checkpointer._decode).
_BORROWED = frozenset({("shared", "model")})

#: Bound on the device memory a cross-node resume broadcast uses at once (NCCL needs GPU tensors).
_BROADCAST_CHUNK = 256 << 20


def _broadcast_bytes(buffer: np.ndarray, source: int) -> None:
    """Broadcast ``buffer`` (uint8, same size everywhere) from ``source`` in place, in chunks."""
    flat = torch.from_numpy(buffer)
    nccl = dist.get_backend() == "nccl"
    for start in range(0, flat.numel(), _BROADCAST_CHUNK):
        part = flat[start : start + _BROADCAST_CHUNK]
        if nccl:
            on_device = part.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(on_device, src=source)
            part.copy_(on_device.cpu())
        else:
            dist.broadcast(part, src=source)


class _DigestThread(threading.Thread):
    """Computes an arena's content digest on its own thread; :meth:`result` re-raises errors."""

    def __init__(self, tree: bytes, view: memoryview, slots: list[codec.TensorSlot]) -> None:
        super().__init__(name="trainer-digest", daemon=True)
        self._args = (tree, view, slots)
        self._digest: str | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._digest = codec.arena_digest(*self._args)
        except BaseException as exc:  # handed to the writer thread by result()
            self._error = exc

    def result(self) -> str:
        """The digest; raises what the computation raised."""
        if self._error is not None:
            raise self._error
        if self._digest is None:
            raise RuntimeError("digest thread has not finished")
        return self._digest


class Checkpointer:
    """Snapshots and resumes a :class:`TrainingState` (see the module docstring).

    Every rank constructs one and calls ``resume()``, ``step_done()`` and ``finish()`` at the
    same points (they are collective). ``hparams`` are recorded in each manifest and compared on
    resume. ``best_metric`` names the metric passed to ``step_done`` that drives keep-best
    (``best_mode`` ``"max"`` or ``"min"``); it must have the same value on every rank.
    ``best_source`` picks the exported weights: ``"ema"`` (when an EMA is registered, the
    default) or ``"model"``. ``verify_digest`` recomputes the content digest on load (the files
    are always checksum-verified; this adds a pass over the state to check the codec too).
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
        every: int | None = None,
        run_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        allow_config_change: bool | None = None,
        best_metric: str | None = None,
        best_mode: Literal["max", "min"] = "max",
        best_source: Literal["ema", "model"] = "ema",
        verify_digest: bool = False,
        staging: Literal["deferred", "sync"] | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        self.settings = settings or WorkerSettings.from_env()
        directory = checkpoint_dir or self.settings.checkpoint_dir
        if not directory:
            raise UsageError("no checkpoint directory: pass checkpoint_dir or set ORCH_CHECKPOINT_DIR")
        if every is None:
            every = self.settings.checkpoint_every if self.settings.checkpoint_every is not None else 0
        if every < 0:
            raise UsageError(f"checkpoint interval must be >= 0 (0 = final only), got {every}")
        if best_mode not in ("max", "min"):
            raise UsageError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if best_source not in ("ema", "model"):
            raise UsageError(f"best_source must be 'ema' or 'model', got {best_source!r}")
        staging = staging or self.settings.snapshot_staging
        if staging not in ("deferred", "sync"):
            raise UsageError(f"staging must be 'deferred' or 'sync', got {staging!r}")
        self.state = state
        self.checkpoint_dir = os.path.abspath(directory)
        self.every = every
        self.run_id = run_id or self.settings.run_id or "local"
        self.hparams = normalize_hparams(hparams)
        self.config_hash = config_hash(self.hparams)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.allow_config_change = (
            self.settings.allow_config_change if allow_config_change is None else allow_config_change
        )
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.best_source = best_source
        self.verify_digest = verify_digest
        if is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.store = LocalSnapshotStore(self.checkpoint_dir)
        self.faults = FaultInjector.from_spec(
            self.settings.faults, rank=self.rank, attempt=self.settings.attempt
        )
        self.writer = BackgroundWriter("trainer-snapshot-writer")
        self.arena = codec.StagingArena(pin_memory=torch.cuda.is_available())
        self.paths = RunPaths.of(self.checkpoint_dir)
        self.exports_dir = exports_root(self.checkpoint_dir)
        os.makedirs(self.paths.progress_dir, exist_ok=True)
        os.makedirs(self.paths.control_dir, exist_ok=True)
        self.last_snapshot_step: int | None = None
        self.resumed_from: int | None = None
        self.last_digest: str | None = None
        self._last_metrics: dict[str, Any] = {}
        self._git_commit: str | None = None
        self._git_checked = False
        self._best_buffers: dict[str, torch.Tensor] | None = None
        self._best_job: Job | None = None
        self._snapshot_job: Job | None = None
        self.staging = staging
        self._staging: DeferredStaging | None = None
        self._last_beat = -math.inf
        self._stepped = False
        #: Seconds the training thread was blocked by the latest snapshot: its synchronous part
        #: plus any wait of ``optimizer.step()`` for the deferred copy.
        self.last_stall_s = 0.0
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

    # -- resume ---------------------------------------------------------------------------

    def resume(self) -> int:
        """Restore the chosen snapshot on every rank; return the step to continue from (0: fresh).

        Every node offers a candidate (its supervisor's choice, or its newest valid local
        snapshot); the newest wins. Nodes that hold it read it from their own disk; when some
        node does not (a replaced node with an empty disk, global rank 0 moved to another node),
        the lowest rank of a holding node reads it, verified, and broadcasts the bytes.
        """
        self._settle_staging()
        if self.settings.spare_gate is not None:
            self._await_promotion(self.settings.spare_gate)
        self._heartbeat()
        step, source = self._plan_resume()
        if step is None:
            log.info("resume.fresh", reason=self.settings.resume_mode)
            self.last_snapshot_step = None
            return 0
        started = time.perf_counter()
        error: BaseException | None = None
        digest: str | None = None
        try:
            digest = self._load(step) if source is None else self._load_broadcast(step, source)
        except Exception as exc:  # re-raised below after every rank learned the outcome
            error = exc
        self._agree(error, f"loading snapshot step {step}")
        self.resumed_from = step
        self.last_snapshot_step = step
        self.last_digest = digest
        log.info(
            "resume.loaded",
            step=step,
            epoch=self.state.epoch,
            digest=digest,
            source_rank=source,
            seconds=round(time.perf_counter() - started, 4),
        )
        self._heartbeat()
        return step

    def _await_promotion(self, gate: str) -> None:
        """Warm spare: wait, started up, until the supervisor promotes this group.

        The gate file appears when the running attempt has failed and its processes are gone;
        it names the step to resume from (``null``: fresh). Polled, because the waker is another
        process; a 5 ms period costs nothing next to the start-up it saves. A SIGTERM (the
        supervisor went away) ends the wait as a preemption with nothing to save.
        """
        started = time.perf_counter()
        log.info("spare.waiting", gate=gate, attempt=self.settings.attempt)
        while not os.path.exists(gate):
            if preemption.signalled():
                raise Preempted(0)
            time.sleep(0.005)
        promotion = read_document(gate, SpareGate)
        if promotion is None:
            raise ResumeError(f"warm spare: unreadable promotion file {gate}")
        step = promotion.resume_step
        self.settings = replace(
            self.settings,
            resume_mode="fresh" if step is None else "step",
            resume_step=step,
            spare_gate=None,
        )
        log.info("spare.promoted", resume_step=step, waited_s=round(time.perf_counter() - started, 3))

    def _candidate(self) -> tuple[bool, int | None]:
        """(known, step): this node's offer; in auto mode only local rank 0 looks (known)."""
        mode = self.settings.resume_mode
        if mode == "fresh":
            return True, None
        if mode == "step":
            return True, self.settings.resume_step
        if self.settings.local_rank != 0:
            return False, None
        info = self.store.newest_valid(verify_checksums=True)
        return True, None if info is None else info.step

    def _plan_resume(self) -> tuple[int | None, int | None]:
        """(step, source rank): source is None when every node holds ``step`` locally."""
        known, mine = self._candidate()
        if not (is_initialized() and self.world_size > 1):
            return mine, None
        offers: list[Any] = [None] * self.world_size
        dist.all_gather_object(offers, (self.settings.group_rank, known, mine))
        by_node: dict[int, int | None] = {}
        for node, node_known, step in offers:
            if node_known:
                by_node[node] = step
        steps = [s for s in by_node.values() if s is not None]
        if not steps:
            return None, None
        chosen = max(steps)
        nodes = {node for node, _known, _step in offers}
        holders = {node for node, step in by_node.items() if step == chosen}
        if holders >= nodes:
            return chosen, None
        source = min(rank for rank, (node, _k, _s) in enumerate(offers) if node in holders)
        log.info(
            "resume.cross_node",
            step=chosen,
            source_rank=source,
            offers={str(n): s for n, s in sorted(by_node.items())},
        )
        return chosen, source

    def _agree(self, error: BaseException | None, what: str) -> None:
        """All ranks learn whether each succeeded; every rank fails if one did."""
        outcomes: list[Any] = [None] * self.world_size
        mine = None if error is None else (type(error).__name__, str(error), bool(getattr(error, "fatal", False)))
        if is_initialized() and self.world_size > 1:
            dist.all_gather_object(outcomes, mine)
        else:
            outcomes = [mine]
        if error is not None:
            raise error
        for peer, outcome in enumerate(outcomes):
            if outcome is not None:
                kind, message, fatal = outcome
                raise PeerFailure(f"rank {peer} failed {what}: {kind}: {message}", fatal=fatal)

    def _read(self, step: int, manifest: Manifest) -> tuple[bytes, np.ndarray]:
        """The snapshot's tree and tensor bytes, every file checksum-verified."""
        tree_bytes = self.store.open_verified(step, TREE_FILE, manifest)
        entry = manifest.files.get(TENSORS_FILE)
        if entry is None:
            raise CorruptSnapshot(f"step {step}: manifest lists no {TENSORS_FILE}")
        # np.empty: no zero-fill of a buffer that is about to be overwritten (gigabytes).
        buffer = np.empty(entry.size, dtype=np.uint8)
        if entry.size:
            self.store.read_into(step, TENSORS_FILE, memoryview(buffer.data))
        return tree_bytes, buffer

    def _check_manifest(self, step: int, manifest: Manifest) -> None:
        """Refuse a snapshot of another world size or (unless allowed) other hyperparameters."""
        if manifest.world_size != self.world_size:
            raise WorldSizeMismatch(step, manifest.world_size, self.world_size)
        self._check_hparams(step, manifest)

    def _load(self, step: int) -> str:
        manifest = self.store.read_manifest(step)
        # Checked before reading gigabytes of tensors.
        self._check_manifest(step, manifest)
        tree_bytes = self.store.open_verified(step, TREE_FILE, manifest)
        # Decoded straight from the page cache while the checksum is computed beside it; nothing
        # decoded is applied before the file is verified.
        with self.store.map_verifying(step, TENSORS_FILE, manifest) as mapped:
            obj, digest = self._decode(tree_bytes, mapped.array)
            mapped.verified()
        return self._apply(step, manifest, obj, digest)

    def _load_broadcast(self, step: int, source: int) -> str:
        """Rank ``source`` reads the snapshot and broadcasts it; every rank applies it."""
        header: list[Any] = [None]
        buffer: np.ndarray | None = None
        if self.rank == source:
            try:
                manifest = self.store.read_manifest(step)
                tree_bytes, buffer = self._read(step, manifest)
                header[0] = ("ok", manifest, tree_bytes, int(buffer.size))
            except Exception as exc:  # every rank must learn it before the bulk broadcast
                header[0] = ("error", type(exc).__name__, str(exc), bool(getattr(exc, "fatal", False)))
                dist.broadcast_object_list(header, src=source)
                raise
        dist.broadcast_object_list(header, src=source)
        if header[0][0] == "error":
            _, kind, message, fatal = header[0]
            raise PeerFailure(f"rank {source} failed reading step {step}: {kind}: {message}", fatal=fatal)
        _, manifest, tree_bytes, size = header[0]
        if buffer is None:
            buffer = np.empty(size, dtype=np.uint8)
        started = time.perf_counter()
        _broadcast_bytes(buffer, source)
        log.info(
            "resume.broadcast",
            step=step,
            bytes=size,
            source_rank=source,
            seconds=round(time.perf_counter() - started, 4),
        )
        self._check_manifest(step, manifest)
        obj, digest = self._decode(tree_bytes, buffer)
        del buffer
        return self._apply(step, manifest, obj, digest)

    def _decode(self, tree_bytes: bytes, arena: np.ndarray) -> tuple[Any, str | None]:
        # Copies, not views into the arena: some consumers misread views (torch.set_rng_state
        # ignores the storage offset; torch.save would write the whole buffer for each), and an
        # optimizer keeps the tensors it is given. The model's are views: Module.load_state_dict
        # copies them into the parameters at once and keeps none.
        return codec.decode_tree(
            codec.parse_tree(tree_bytes),
            arena,
            copy=True,
            compute_digest=self.verify_digest,
            borrow=_BORROWED,
        )

    def _apply(self, step: int, manifest: Manifest, obj: Any, digest: str | None) -> str:
        if digest is not None and digest != manifest.digest:
            raise CorruptSnapshot(
                f"step {step}: content digest {digest} differs from manifest {manifest.digest}"
            )
        if not isinstance(obj, dict) or not {"shared", "ranks", "world_size"} <= obj.keys():
            raise CorruptSnapshot(f"step {step}: tree.json does not hold a training state")
        if obj["world_size"] != self.world_size:
            raise WorldSizeMismatch(step, int(obj["world_size"]), self.world_size)
        mine = obj["ranks"].get(self.rank)
        if mine is None:
            raise CorruptSnapshot(f"step {step}: no per-rank state for rank {self.rank}")
        self.state.load_shared_state_dict(obj["shared"])
        self.state.load_rank_state_dict(mine)
        if self.state.step != step or int(mine["step"]) != step:
            raise CorruptSnapshot(
                f"snapshot directory step {step} holds state of step {self.state.step}"
            )
        return manifest.digest

    def _check_hparams(self, step: int, manifest: Manifest) -> None:
        saved = manifest.metadata.get("hparams")
        if not isinstance(saved, dict):
            saved = {}
        differences = diff_hparams(saved, self.hparams)
        if not differences:
            return
        if not self.allow_config_change:
            raise ConfigMismatch(step, differences)
        log.warning("resume.config_changed", step=step, keys=sorted(differences))

    # -- per step -------------------------------------------------------------------------

    def step_done(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record that ``step`` fully completed; heartbeat, keep-best and periodic snapshot."""
        if step <= self.state.step and self.state.step != 0:
            raise UsageError(f"step_done({step}) after step {self.state.step}: steps must increase")
        self.state.step = step
        if self.rank == 0:
            self.writer.raise_if_failed()
        if metrics:
            self._last_metrics = {str(k): _json_metric(v) for k, v in metrics.items()}
            self._track_best(step, metrics)
        snapshot_due = self.every > 0 and step % self.every == 0
        first, self._stepped = not self._stepped, True
        # A heartbeat is a file write and rename (~0.3 ms): rate-limited, so that short steps
        # do not pay it every time. The supervisor's watchdog counts in seconds.
        if (
            snapshot_due
            or first
            or time.monotonic() - self._last_beat >= self.settings.heartbeat_interval_s
        ):
            self._heartbeat()
        self.faults.point("step_end", step)
        if snapshot_due:
            self.snapshot()
        elif self.rank == 0 and self._snapshot_job is None:
            self._reserve_arena()
        if step % self.settings.preempt_check_every == 0 and self._preempt_agreed():
            self._emergency_stop(step)

    def _preempt_agreed(self) -> bool:
        """Whether any rank saw a preemption request; every rank gets the same answer.

        Each rank looks for the supervisor's control file (one ``stat``) and its own signal
        flag; ranks may notice at different steps, so one all-reduce(MAX) of a single integer
        per step makes them agree on this very step boundary.
        """
        mine = preemption.signalled() or (
            os.path.exists(self.paths.preempt_request)
            and preemption.read_request(self.paths, self.settings.attempt) is not None
        )
        if not (is_initialized() and self.world_size > 1):
            return mine
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        flag = torch.tensor([1 if mine else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _emergency_stop(self, step: int) -> None:
        """Snapshot this step (unless just taken), wait for its commit, acknowledge, stop."""
        started = time.perf_counter()
        log.warning("preempt.requested", step=step)
        self._heartbeat()
        if self.last_snapshot_step != step:
            self.snapshot()
        if self.rank == 0:
            self.writer.wait()  # the emergency snapshot is committed (or its error re-raised)
            ack = PreemptAck(
                step=step, attempt=self.settings.attempt, time=time.time(), digest=self.last_digest
            )
            write_document(self.paths.preempt_ack, ack, durable=True)
        # No rank exits before rank 0 committed: torchrun stops the whole group on the first exit.
        if is_initialized() and self.world_size > 1:
            dist.barrier()
            if self.rank != 0 and self.settings.local_rank == 0:
                # Every node's supervisor waits for an ack in its own checkpoint dir; the
                # snapshot itself is on rank 0's node (and its mirror).
                ack = PreemptAck(
                    step=step,
                    attempt=self.settings.attempt,
                    time=time.time(),
                    digest=self.last_digest,
                    snapshot_rank=0,
                )
                write_document(self.paths.preempt_ack, ack, durable=True)
        log.warning(
            "preempt.snapshot_committed",
            step=step,
            seconds=round(time.perf_counter() - started, 4),
            digest=self.last_digest,
        )
        raise Preempted(step)

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
        )
        write_document(self.paths.heartbeat(self.rank), beat, durable=False)

    def _track_best(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.best_metric is None or self.best_metric not in metrics:
            return
        raw = _json_metric(metrics[self.best_metric])
        if not isinstance(raw, int | float) or isinstance(raw, bool) or not math.isfinite(raw):
            return
        value = float(raw)
        best = self.state.best_metric
        improved = best is None or (value > best if self.best_mode == "max" else value < best)
        if not improved:
            return
        self.state.best_metric = value
        log.info("best.improved", step=step, metric=self.best_metric, value=value)
        if self.rank == 0:
            self._export_best(step, value)

    def _best_weights_source(self) -> tuple[str, dict[str, torch.Tensor]]:
        ema = self.state.ema
        if self.best_source == "ema" and ema is not None:
            inner = getattr(ema, "module", None)
            sd = inner.state_dict() if isinstance(inner, torch.nn.Module) else ema.state_dict()
            return "ema", {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return "model", dict(self.state.unwrapped_model.state_dict())

    def _export_best(self, step: int, value: float) -> None:
        if self._best_job is not None:
            self._best_job.wait()
            self.writer.raise_if_failed()
        source, weights = self._best_weights_source()
        buffers = self._best_buffers
        if buffers is None or buffers.keys() != weights.keys() or any(
            buffers[k].shape != v.shape or buffers[k].dtype != v.dtype for k, v in weights.items()
        ):
            buffers = {k: torch.empty_like(v, device="cpu") for k, v in weights.items()}
            self._best_buffers = buffers
        for k, v in weights.items():
            buffers[k].copy_(v.detach())
        sidecar = {
            "step": step,
            "metric": self.best_metric,
            "value": value,
            "mode": self.best_mode,
            "source": source,
            "metrics": dict(self._last_metrics),
            "run_id": self.run_id,
        }
        exports_dir = self.exports_dir
        frozen = buffers

        def job() -> None:
            write_weights_export(exports_dir, "best", frozen, sidecar)
            log.info("export.best_written", step=step, value=value, source=source)

        self._best_job = self.writer.submit(job, label=f"best@{step}")

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Take a snapshot of the current step (collective: every rank must call it)."""
        step = self.state.step
        started = time.perf_counter()
        self._settle_staging()
        gathered = self._gather_rank_states()
        self.last_snapshot_step = step
        if self.rank != 0:
            return
        if gathered is None:
            raise SnapshotError("rank 0 received no per-rank states")
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
        metadata = self._manifest_metadata()
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
        encoded = codec.encode(self.state.snapshot_object([self.state.rank_state_dict()] * self.world_size))
        encoded.sources = []
        arena = self.arena
        self._snapshot_job = self.writer.submit(lambda: arena.reserve(encoded), label="reserve")

    def _gather_rank_states(self) -> list[dict[str, Any]] | None:
        rank_state = self.state.rank_state_dict()
        if not (is_initialized() and self.world_size > 1):
            return [rank_state]
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(rank_state, gathered, dst=0)
        return gathered

    def live_digest(self) -> str | None:
        """Digest a snapshot taken now would record (collective; the value on rank 0, else None).

        For correctness gates: compare it with the manifest digest of another run.
        """
        gathered = self._gather_rank_states()
        if gathered is None:
            return None
        return codec.state_digest(self.state.snapshot_object(gathered))

    def _manifest_metadata(self) -> dict[str, Any]:
        if not self._git_checked:
            script = sys.argv[0] if sys.argv and sys.argv[0] else ""
            self._git_commit = git_commit(os.path.dirname(os.path.abspath(script)) or os.getcwd())
            self._git_checked = True
        lrs = self.state.lr()
        return {
            "hparams": self.hparams,
            "config_hash": self.config_hash,
            "git_commit": self._git_commit,
            "dataset_version": self.metadata.get(
                "dataset_version", self.state.metadata.get("dataset_version")
            ),
            "torch_version": torch.__version__,
            "lr": _json_metric(lrs[0]) if lrs else None,
            "lrs": [_json_metric(x) for x in lrs],
            "metrics": dict(self._last_metrics),
            "best_metric": _json_metric(self.state.best_metric),
            "user": json.loads(json.dumps({**self.state.metadata, **self.metadata}, default=str)),
            "attempt": self.settings.attempt,
        }

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
            # The digest (one sha256 pass) runs beside the file write and its checksum (another
            # pass): hashlib and os.write release the GIL, so the two overlap.
            digester = _DigestThread(encoded.canonical_tree_bytes(), view, encoded.slots)
            digester.start()
            try:
                with writer.open(TENSORS_FILE, direct=True) as f:
                    # One call: the file chunks it, hashing each chunk beside its write.
                    f.write(view)
            finally:
                digester.join()
            digest = digester.result()
            writer.write_bytes(TREE_FILE, encoded.tree_bytes())
            manifest = writer.commit(
                run_id=self.run_id,
                epoch=epoch,
                world_size=self.world_size,
                digest=digest,
                metadata=metadata,
            )
        except BaseException:
            writer.abort()
            raise
        self.last_digest = digest
        log.info(
            "snapshot.committed",
            step=step,
            bytes=manifest.total_bytes,
            seconds=round(time.perf_counter() - started, 4),
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
        if self.rank == 0:
            self.writer.wait()
            weights = {
                k: v.detach().to("cpu", copy=True)
                for k, v in self.state.unwrapped_model.state_dict().items()
            }
            path = write_weights_export(
                self.exports_dir,
                "last",
                weights,
                {"step": step, "metrics": dict(self._last_metrics), "run_id": self.run_id,
                 "digest": self.last_digest},
            )
            log.info("export.last_written", step=step, path=path)
            self.writer.close()
        if is_initialized() and self.world_size > 1:
            dist.barrier()
        log.info("run.finished", step=step, digest=self.last_digest)

    def close(self) -> None:
        """Wait for pending writes, stop the writer thread, remove the optimizer hook.

        Re-raises a pending error.
        """
        self._guard.remove()
        self._settle_staging()
        self.writer.close()
