"""Read-only views of a checkpoint dir: ``orchestrator status`` and ``orchestrator snapshots``.

Both commands only read: they never take the supervisor's lock, never create directories and
never delete anything, so they are safe to run against a live run. ``status`` starts from the
supervisor's ``run/state.json`` and refreshes what can be observed directly (heartbeat ages,
newest snapshot, whether a supervisor still holds the lock). ``snapshots`` lists committed
snapshots oldest first; without ``--verify`` a snapshot is ``valid`` when its manifest parses and
every listed file has the recorded size, with ``--verify`` its checksums are checked as well, and
with ``--verify=deep`` the content digest of the state is recomputed from the files and compared
with the manifest's too (storage.content: no torch here).
"""

from __future__ import annotations

import os
from typing import Any

from contract.codes import TERMINAL_PHASE_NAMES
from contract.documents import DeterminismReport, summarize_determinism
from contract.paths import RunPaths
from orchestrator import goodput
from orchestrator.clock import Clock
from orchestrator.mirror import call_bounded, mirror_lag
from orchestrator.runstate import lock_is_held, read_determinism, read_heartbeats, read_state
from orchestrator.settings import Settings
from storage import LocalSnapshotStore, RemoteTier, SnapshotTier
from storage.remote import RemoteSnapshotStore


class NoRunState(Exception):
    """The directory has no ``run/state.json``: no supervisor ever ran there."""


def _snapshots_dir(checkpoint_dir: str) -> str:
    return os.path.join(os.path.abspath(checkpoint_dir), "snapshots")


def snapshot_records(
    checkpoint_dir: str, *, verify: bool, deep: bool = False
) -> list[dict[str, Any]]:
    """One ``snapshots --json`` record per committed snapshot, oldest first.

    Snapshots whose manifest is missing or unreadable are included as invalid rows with their
    ``reason``, so an operator sees them. ``verified`` tells whether checksums were checked,
    ``verified_content`` whether the content digest was recomputed too (``deep``).
    """
    if not os.path.isdir(_snapshots_dir(checkpoint_dir)):
        return []
    store = LocalSnapshotStore(checkpoint_dir, verify_content=deep)
    return _records(store, verify=verify or deep, deep=deep)


def remote_snapshot_records(
    remote: RemoteTier, *, verify: bool, deep: bool = False
) -> list[dict[str, Any]]:
    """``snapshots --mirror URL`` records (tier ``remote``), oldest first, same fields as local.

    Without ``--verify`` the manifest is read and each object's size checked; with it every
    object is downloaded and its checksum checked (nothing is written locally); ``deep`` also
    recomputes the content digest from the streamed bytes.
    """
    if isinstance(remote, RemoteSnapshotStore) and remote.verify_content != deep:
        # The same store and prefix; only whether checksum validation includes the content.
        remote = RemoteSnapshotStore(remote.url, store=remote.store, verify_content=deep)
    return _records(remote, verify=verify or deep, deep=deep)


def _records(tier: SnapshotTier, *, verify: bool, deep: bool = False) -> list[dict[str, Any]]:
    """One record per listed snapshot of either tier; already-invalid rows are not re-checked."""
    out: list[dict[str, Any]] = []
    for info in tier.list():
        checked = info if info.valid is False else tier.validate(info.step, verify_checksums=verify)
        record = checked.to_json()
        if record.get("reason") is None:
            record.pop("reason", None)
        record["verified"] = verify
        record["verified_content"] = deep
        record["components"] = dict(checked.manifest.components) if checked.manifest else {}
        out.append(record)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def remote_status_document(
    remote: RemoteTier, *, clock: Clock, settings: Settings
) -> dict[str, Any]:
    """The ``status --mirror URL --json`` object, from every node's mirrored ``state.json``.

    The top-level fields come from node 0's document (the lowest node rank found); ``nodes``
    aggregates every node; ``step`` and ``newest_local_step`` are the maxima over nodes;
    ``newest_remote_step`` is read from the remote listing itself. ``heartbeat_age_s`` is aged
    by the time since each document was mirrored, and ``supervisor_alive`` is true when some
    non-terminal node mirrored its state within three state-mirror intervals.
    """
    docs = [d for d in call_bounded(settings, remote.get_state) if isinstance(d, dict)]
    if not docs:
        raise NoRunState("no run found on the mirror (no run/node-*/state.json)")
    now = clock.time()

    def rank_of(d: dict[str, Any]) -> int:
        nodes = d.get("nodes")
        if isinstance(nodes, list) and nodes and isinstance(nodes[0], dict):
            r = nodes[0].get("node_rank")
            if isinstance(r, int):
                return r
        return 1 << 30

    docs.sort(key=rank_of)
    doc: dict[str, Any] = dict(docs[0])
    nodes: list[dict[str, Any]] = []
    alive = False
    fresh_s = 3 * settings.state_mirror_interval_s
    for d in docs:
        updated = _number(d.get("updated_at"))
        since = max(0.0, now - updated) if updated is not None else None
        terminal = d.get("phase") in TERMINAL_PHASE_NAMES
        if since is not None and since <= fresh_s and not terminal:
            alive = True
        raw = d.get("nodes")
        for node in raw if isinstance(raw, list) else []:
            if not isinstance(node, dict):
                continue
            node = dict(node)
            age = _number(node.get("heartbeat_age_s"))
            if age is not None and since is not None:
                node["heartbeat_age_s"] = round(age + since, 3)
            node["state_age_s"] = None if since is None else round(since, 3)
            nodes.append(node)
    doc["nodes"] = nodes
    doc["supervisor_alive"] = alive

    def best(key: str) -> int | None:
        values = [v for d in docs if isinstance(v := d.get(key), int) and not isinstance(v, bool)]
        return max(values) if values else None

    doc["step"] = best("step")
    doc["newest_local_step"] = best("newest_local_step")
    listed = call_bounded(settings, remote.list)
    usable = [i.step for i in listed if i.valid is not False]
    doc["newest_remote_step"] = max(usable) if usable else None
    doc["mirror_lag_steps"] = mirror_lag(doc["newest_local_step"], doc["newest_remote_step"])
    for key in ("resumed_from_step", "last_failure", "mirror_error"):
        doc.setdefault(key, None)
    doc["determinism"] = merge_determinism([d.get("determinism") for d in docs])
    # events.jsonl is not mirrored: goodput and incidents only if a state.json carries them.
    for key in ("goodput", "incidents", "goodput_detail"):
        doc.setdefault(key, None)
    return doc


def merge_determinism(audits: list[Any]) -> dict[str, Any]:
    """Every node's ``determinism`` (each merged over its own ranks by its supervisor) as one,
    by the same rule as the ranks' (:func:`contract.documents.summarize_determinism`): the
    earliest divergence of any node, else verified through the least step any verified node
    checked, else ``unchecked`` (also for documents of supervisors that did not copy it)."""
    reports = []
    for audit in audits:
        if isinstance(audit, dict):
            # A node's summary names a rank only when it diverged; any rank serves otherwise.
            rank = audit.get("rank") if isinstance(audit.get("rank"), int) else 0
            report = DeterminismReport.from_json(audit, rank=rank)
            if report is not None:
                reports.append(report)
    return summarize_determinism(reports)


def status_document(checkpoint_dir: str, *, clock: Clock) -> dict[str, Any]:
    """The ``status --json`` object: ``state.json`` refreshed with live observations."""
    paths = RunPaths.of(checkpoint_dir)
    # Liveness first, state second: the supervisor writes its terminal state before it releases
    # the lock, so "not alive" here guarantees the state read next is the final one. The other
    # order could pair a stale "running" with "not alive" (and end `--watch` on it).
    alive = lock_is_held(paths.checkpoint_dir)
    state = read_state(paths)
    if state is None:
        if os.path.exists(paths.state):
            raise NoRunState(f"{paths.state} is damaged (not a JSON object, or over the size or "
                             "nesting limits); a running supervisor rewrites it within seconds")
        raise NoRunState(f"no run found in {paths.checkpoint_dir} (run/state.json is missing)")
    doc: dict[str, Any] = dict(state)
    now = clock.time()
    doc["supervisor_alive"] = alive
    attempt = doc.get("attempt")
    beats = [b for b in read_heartbeats(paths) if b.attempt == attempt]
    if beats:
        newest = max(beats, key=lambda b: (b.step, b.time))
        if not isinstance(doc.get("step"), int) or newest.step > doc["step"]:
            doc["step"] = newest.step
    raw_nodes = doc.get("nodes")
    nodes: list[Any] = raw_nodes if isinstance(raw_nodes, list) else []
    for node in nodes:
        if isinstance(node, dict):
            if beats:
                node["heartbeat_age_s"] = round(max(0.0, now - max(b.time for b in beats)), 3)
            if not alive and node.get("phase") not in TERMINAL_PHASE_NAMES:
                node["phase"] = "unknown"
    doc["nodes"] = nodes
    if os.path.isdir(_snapshots_dir(checkpoint_dir)):
        listed = LocalSnapshotStore(checkpoint_dir).list()
        usable = [i.step for i in listed if i.valid is not False]
        doc["newest_local_step"] = max(usable) if usable else None
    for key in ("newest_remote_step", "mirror_lag_steps", "resumed_from_step", "last_failure"):
        doc.setdefault(key, None)
    doc["determinism"] = read_determinism(paths, doc.get("run_id"))
    # Goodput and incidents from run/events.jsonl (+ rank 0's journal, snapshot manifests);
    # a live run's open launch is counted up to now.
    doc.update(goodput.status_fields(checkpoint_dir, now=now if alive else None))
    return doc


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render_determinism(audit: Any) -> str:
    """The ``determinism`` line of the status table."""
    if not isinstance(audit, dict) or audit.get("state") not in ("verified", "diverged"):
        return "unchecked (no recovery re-executed a journaled step yet)"
    if audit["state"] == "verified":
        return f"verified through step {_cell(audit.get('checked_through_step'))}"
    return (
        f"DIVERGED at step {_cell(audit.get('first_divergence_step'))} "
        f"(rank {_cell(audit.get('rank'))}, {_cell(audit.get('fingerprint'))}: expected "
        f"{_cell(audit.get('expected'))}, got {_cell(audit.get('got'))})"
    )


def render_status(doc: dict[str, Any]) -> str:
    """A readable multi-line view of a status document."""
    keys = (
        "run_id",
        "phase",
        "supervisor_alive",
        "step",
        "attempt",
        "restarts",
        "preemptions",
        "resumed_from_step",
        "newest_local_step",
        "newest_remote_step",
        "mirror_lag_steps",
        "mirror_error",
        "last_failure",
    )
    width = max(len(k) for k in keys)
    lines = [f"{k:<{width}}  {_cell(doc.get(k))}" for k in keys]
    lines.append(f"{'determinism':<{width}}  {render_determinism(doc.get('determinism'))}")
    lines.append(f"{'goodput':<{width}}  {goodput.render_line(doc)}")
    lines.append("nodes:")
    lines.append(f"  {'node_rank':>9}  {'phase':<12}  heartbeat_age_s")
    for node in doc.get("nodes") or []:
        if isinstance(node, dict):
            lines.append(
                f"  {_cell(node.get('node_rank')):>9}  {_cell(node.get('phase')):<12}  "
                f"{_cell(node.get('heartbeat_age_s'))}"
            )
    return "\n".join(lines)


def render_snapshots(records: list[dict[str, Any]]) -> str:
    """A readable table of snapshot records."""
    if not records:
        return "no snapshots"
    header = f"{'step':>12}  {'tier':<6}  {'valid':<5}  {'bytes':>12}  {'digest':<23}  detail"
    lines = [header]
    for r in records:
        digest = str(r.get("digest") or "-")
        if len(digest) > 23:
            digest = digest[:20] + "..."
        valid = {True: "yes", False: "NO", None: "?"}[r.get("valid")]
        detail = r.get("reason") or r.get("path") or ""
        lines.append(
            f"{r['step']:>12}  {r.get('tier', '-'):<6}  {valid:<5}  {_cell(r.get('bytes')):>12}  "
            f"{digest:<23}  {detail}"
        )
    if records[0].get("verified_content"):
        checked = "checksums and content digests verified"
    elif records[0].get("verified"):
        checked = "checksums verified"
    else:
        checked = "sizes checked, not checksums"
    lines.append(f"({checked})")
    return "\n".join(lines)
