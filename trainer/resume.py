"""Resume: choose a snapshot across nodes, load it verified, and restore it on every rank.

:class:`Resumer` is the resume half of :class:`trainer.Checkpointer`. A warm spare first waits
for its promotion gate; then every node offers a candidate (its supervisor's
``ORCH_RESUME_STEP``, or in auto mode the newest valid local snapshot) and the newest offer
wins. Nodes that hold it read it from their own disk, decoding from the mapped file while its
checksum and the state's content digest run beside them and applying nothing before both match
the manifest (checksums alone pass a tree rewritten together with them; the content digest ties
the decoded state to the saved one). When some node does not hold it, the lowest rank of a
holding node reads it and broadcasts the bytes over the process group, and every rank checks
the content digest of what it received. Anything wrong is ``CorruptSnapshot``, which the
supervisor answers by verifying every snapshot and falling back to the previous valid one.
The manifest's world size and hyperparameters are checked (:class:`ResumePolicy`) before
gigabytes are read, and every rank learns whether all the others succeeded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import structlog
import torch
import torch.distributed as dist

from contract.documents import SpareGate, read_document
from storage import LocalSnapshotStore, Manifest
from storage.content import content_plan
from storage.errors import CorruptSnapshot
from storage.sharded import is_sharded
from trainer import codec, preemption
from trainer.codec import TENSORS_FILE, TREE_FILE
from trainer.distributed import is_initialized
from trainer.errors import (
    CodecError,
    ConfigMismatch,
    PeerFailure,
    Preempted,
    ResumeError,
    UsageError,
    WorldSizeMismatch,
)
from trainer.reshape import rank_state_for
from trainer.settings import WorkerSettings
from trainer.state import TrainingState

log = structlog.get_logger("trainer.resume")

_ABSENT = "<absent>"
#: Parts of a snapshot decoded as views into the read buffer (see Resumer._decode).
_BORROWED = frozenset({("shared", "model")})
#: Bound on the device memory a cross-node resume broadcast uses at once (NCCL needs GPU tensors).
_BROADCAST_CHUNK = 256 << 20


@dataclass(frozen=True, kw_only=True)
class ResumePolicy:
    """How strictly a resume checks the snapshot it loads.

    ``allow_config_change`` (None: ``--allow-config-change``, i.e. ``ORCH_ALLOW_CONFIG_CHANGE``)
    resumes despite hyperparameters that differ from the snapshot's (logged), instead of
    refusing with :class:`~trainer.errors.ConfigMismatch`. The files' checksums and the
    state's content digest are always verified on load (beside the decode); ``verify_digest``
    adds a second digest pass over the regions the decoder actually read, on the loading thread. ``ignore_hparams`` names hyperparameters that do not change the
    trajectory (``("log_interval", "eval_interval")``): they are still recorded in every
    manifest but a difference in them (or their presence on one side only) never refuses a
    resume.
    """

    allow_config_change: bool | None = None
    verify_digest: bool = False
    ignore_hparams: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.allow_config_change is not None and not isinstance(self.allow_config_change, bool):
            raise UsageError(
                f"ResumePolicy.allow_config_change must be a bool or None, got {self.allow_config_change!r}"
            )
        if not isinstance(self.verify_digest, bool):
            raise UsageError(f"ResumePolicy.verify_digest must be a bool, got {self.verify_digest!r}")
        ignore = self.ignore_hparams
        # A bare string would silently ignore its characters instead of the key it names.
        named = not isinstance(ignore, str | bytes) and isinstance(ignore, Iterable)
        keys = tuple(ignore) if named else ()
        if not named or not all(isinstance(k, str) for k in keys):
            raise UsageError(
                f"ResumePolicy.ignore_hparams must be a sequence of key names, got {ignore!r}"
            )
        object.__setattr__(self, "ignore_hparams", keys)


class ResumeHost(Protocol):
    """What the resume reads from the checkpointer it serves (attributes, read at each use)."""

    settings: WorkerSettings
    state: TrainingState
    store: LocalSnapshotStore
    rank: int
    world_size: int
    hparams: dict[str, Any]


def diff_hparams(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: Collection[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ, mapped to ``(saved, current)`` (``"<absent>"`` when missing).

    Keys in ``ignore`` are never compared (settings that do not change the trajectory).
    """
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted((set(saved) | set(current)) - set(ignore)):
        a, b = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        if a != b or type(a) is not type(b):
            out[key] = (a, b)
    return out


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


def parse_snapshot_tree(step: int, tree_bytes: bytes) -> dict[str, Any]:
    """``tree.json`` of a checksum-verified snapshot; unparseable is a corrupt snapshot."""
    try:
        return codec.parse_tree(tree_bytes)
    except CodecError as exc:
        raise CorruptSnapshot(f"step {step}: {exc}") from exc


class Resumer:
    """Selects, loads and applies the snapshot to resume from (collective on every rank)."""

    def __init__(self, host: ResumeHost, policy: ResumePolicy) -> None:
        self.host = host
        self.policy = policy

    @property
    def allow_config_change(self) -> bool:
        """The policy's choice, else the supervisor's ``--allow-config-change``."""
        allow = self.policy.allow_config_change
        return self.host.settings.allow_config_change if allow is None else allow

    def await_promotion(self) -> None:
        """Warm spare: wait, started up, until the supervisor promotes this group (else no-op).

        The gate file appears when the running attempt has failed and its processes are gone;
        it names the step to resume from (``null``: fresh). Polled, because the waker is another
        process; a 5 ms period costs nothing next to the start-up it saves. A SIGTERM (the
        supervisor went away) ends the wait as a preemption with nothing to save.
        """
        host = self.host
        gate = host.settings.spare_gate
        if gate is None:
            return
        started = time.perf_counter()
        log.info("spare.waiting", gate=gate, attempt=host.settings.attempt)
        while not os.path.exists(gate):
            if preemption.signalled():
                raise Preempted(0)
            time.sleep(0.005)
        promotion = read_document(gate, SpareGate)
        if promotion is None:
            raise ResumeError(f"warm spare: unreadable promotion file {gate}")
        step = promotion.resume_step
        host.settings = replace(
            host.settings,
            resume_mode="fresh" if step is None else "step",
            resume_step=step,
            spare_gate=None,
        )
        log.info("spare.promoted", resume_step=step, waited_s=round(time.perf_counter() - started, 3))

    def load(self) -> tuple[int, str] | None:
        """Restore the chosen snapshot: ``(step, manifest digest)``, or None for a fresh start."""
        step, source = self._plan()
        if step is None:
            log.info("resume.fresh", reason=self.host.settings.resume_mode)
            return None
        started = time.perf_counter()
        error: BaseException | None = None
        digest = ""
        try:
            sharding = getattr(self.host, "sharding", None)  # FSDP2: trainer.sharded loads
            if sharding is not None:
                digest = sharding.load(self, step, source)
            else:
                digest = self._load(step) if source is None else self._load_broadcast(step, source)
        except Exception as exc:  # re-raised below after every rank learned the outcome
            error = exc
        self._agree(error, f"loading snapshot step {step}")
        log.info(
            "resume.loaded",
            step=step,
            epoch=self.host.state.epoch,
            digest=digest,
            source_rank=source,
            seconds=round(time.perf_counter() - started, 4),
        )
        return step, digest

    def _candidate(self) -> tuple[bool, int | None]:
        """(known, step): this node's offer; in auto mode only local rank 0 looks (known)."""
        settings = self.host.settings
        if settings.resume_mode == "fresh":
            return True, None
        if settings.resume_mode == "step":
            return True, settings.resume_step
        if settings.local_rank != 0:
            return False, None
        info = self.host.store.newest_valid(verify_checksums=True)
        return True, None if info is None else info.step

    def _plan(self) -> tuple[int | None, int | None]:
        """(step, source rank): source is None when every node holds ``step`` locally."""
        known, mine = self._candidate()
        world_size = self.host.world_size
        if not (is_initialized() and world_size > 1):
            return mine, None
        offers: list[Any] = [None] * world_size
        dist.all_gather_object(offers, (self.host.settings.group_rank, known, mine))
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
        world_size = self.host.world_size
        outcomes: list[Any] = [None] * world_size
        mine = None if error is None else (type(error).__name__, str(error), bool(getattr(error, "fatal", False)))
        if is_initialized() and world_size > 1:
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
        store = self.host.store
        tree_bytes = store.open_verified(step, TREE_FILE, manifest)
        entry = manifest.files.get(TENSORS_FILE)
        if entry is None:
            raise CorruptSnapshot(f"step {step}: manifest lists no {TENSORS_FILE}")
        # np.empty: no zero-fill of a buffer that is about to be overwritten (gigabytes).
        buffer = np.empty(entry.size, dtype=np.uint8)
        if entry.size:
            store.read_into(step, TENSORS_FILE, memoryview(buffer.data))
        return tree_bytes, buffer

    def _check_manifest(self, step: int, manifest: Manifest) -> None:
        """Refuse a snapshot of another world size or (unless allowed) other hyperparameters."""
        if manifest.world_size != self.host.world_size:
            if not self.host.settings.allow_world_size_change:
                raise WorldSizeMismatch(step, manifest.world_size, self.host.world_size)
            if self.host.rank == 0:
                log.warning(
                    "resume.world_size_changed",
                    step=step,
                    saved_world_size=manifest.world_size,
                    world_size=self.host.world_size,
                )
        saved = manifest.metadata.get("hparams")
        differences = diff_hparams(
            saved if isinstance(saved, dict) else {}, self.host.hparams,
            ignore=self.policy.ignore_hparams,
        )
        if not differences:
            return
        if not self.allow_config_change:
            raise ConfigMismatch(step, differences)
        log.warning("resume.config_changed", step=step, keys=sorted(differences))

    def _load(self, step: int) -> str:
        store = self.host.store
        manifest = store.read_manifest(step)
        # Checked before reading gigabytes of tensors.
        self._check_manifest(step, manifest)
        if is_sharded(manifest):  # its digest is not the codec's: never call it corrupt here
            from trainer.errors import StateMismatch

            raise StateMismatch(f"step {step} is a sharded (FSDP2) snapshot; this model has no DTensors")
        tree_bytes = store.open_verified(step, TREE_FILE, manifest)
        entry = manifest.files.get(TENSORS_FILE)
        if entry is None:
            raise CorruptSnapshot(f"step {step}: manifest lists no {TENSORS_FILE}")
        tree = parse_snapshot_tree(step, tree_bytes)
        plan = content_plan(tree, entry.size)
        # Decoded straight from the page cache while the checksum and the content digest are
        # computed beside it; nothing decoded is applied before both match the manifest.
        with store.map_verifying(step, TENSORS_FILE, manifest, content=plan) as mapped:
            try:
                obj, digest = self._decode(tree, mapped.array)
            except CodecError as exc:
                mapped.verified()  # a damaged file explains a failed decode best
                raise CorruptSnapshot(f"step {step}: {exc}") from exc
            mapped.verified()
        return self._apply(step, manifest, obj, digest)

    def _load_broadcast(self, step: int, source: int) -> str:
        """Rank ``source`` reads the snapshot and broadcasts it; every rank applies it."""
        header: list[Any] = [None]
        buffer: np.ndarray | None = None
        if self.host.rank == source:
            try:
                manifest = self.host.store.read_manifest(step)
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
        tree = parse_snapshot_tree(step, tree_bytes)
        content_plan(tree, size)
        try:
            # Always with the digest: these bytes crossed the network after the source's checks.
            obj, digest = self._decode(tree, buffer, compute_digest=True)
        except CodecError as exc:
            raise CorruptSnapshot(f"step {step}: {exc}") from exc
        del buffer
        return self._apply(step, manifest, obj, digest)

    def _decode(
        self, tree: dict[str, Any], arena: np.ndarray, *, compute_digest: bool = False
    ) -> tuple[Any, str | None]:
        # Copies, not views into the arena: some consumers misread views (torch.set_rng_state
        # ignores the storage offset; torch.save would write the whole buffer for each), and an
        # optimizer keeps the tensors it is given. The model's are views: Module.load_state_dict
        # copies them into the parameters at once and keeps none.
        return codec.decode_tree(
            tree,
            arena,
            copy=True,
            compute_digest=compute_digest or self.policy.verify_digest,
            borrow=_BORROWED,
        )

    def _apply(self, step: int, manifest: Manifest, obj: Any, digest: str | None) -> str:
        if digest is not None and digest != manifest.digest:
            raise CorruptSnapshot(
                f"step {step}: content digest {digest} differs from manifest {manifest.digest}"
            )
        apply_state(self.host, step, manifest, obj)
        return manifest.digest


def apply_state(
    host: ResumeHost,
    step: int,
    manifest: Manifest,
    obj: Any,
    *,
    model_and_optimizer: Callable[[Any, Any], None] | None = None,
) -> None:
    """Apply a verified snapshot object (``TrainingState.snapshot_object``) on this rank.

    The shared state, then this rank's per-rank state: its own, or after a world-size change
    (allowed by ``_check_manifest``) the one :func:`trainer.reshape.rank_state_for` builds.
    ``model_and_optimizer`` loads those two instead of their ``load_state_dict`` (sharded).
    """
    if not isinstance(obj, dict) or not {"shared", "ranks", "world_size"} <= obj.keys():
        raise CorruptSnapshot(f"step {step}: tree.json does not hold a training state")
    saved_world = int(obj["world_size"])
    if saved_world != manifest.world_size:
        raise CorruptSnapshot(
            f"step {step}: tree.json holds {saved_world} ranks, the manifest {manifest.world_size}"
        )
    if saved_world == host.world_size and host.rank not in obj["ranks"]:
        raise CorruptSnapshot(f"step {step}: no per-rank state for rank {host.rank}")
    mine = rank_state_for(
        obj["ranks"], saved_world_size=saved_world, rank=host.rank,
        world_size=host.world_size, step=step,
    )
    host.state.load_shared_state_dict(obj["shared"], model_and_optimizer=model_and_optimizer)
    host.state.load_rank_state_dict(mine)
    if host.state.step != step or int(mine["step"]) != step:
        raise CorruptSnapshot(f"snapshot directory step {step} holds state of step {host.state.step}")
