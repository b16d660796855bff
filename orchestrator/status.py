"""Read-only views of a checkpoint dir: ``orchestrator status`` and ``orchestrator snapshots``.

Both commands only read: they never take the supervisor's lock, never create directories and
never delete anything, so they are safe to run against a live run. ``status`` starts from the
supervisor's ``run/state.json`` and refreshes what can be observed directly (heartbeat ages,
newest snapshot, whether a supervisor still holds the lock). ``snapshots`` lists committed
snapshots oldest first; without ``--verify`` a snapshot is ``valid`` when its manifest parses and
every listed file has the recorded size, with ``--verify`` its checksums are checked as well.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.clock import Clock
from orchestrator.runstate import RunPaths, lock_is_held, read_heartbeats, read_state
from storage import LocalSnapshotStore

TERMINAL_PHASES = ("done", "failed")


class NoRunState(Exception):
    """The directory has no ``run/state.json``: no supervisor ever ran there."""


def _snapshots_dir(checkpoint_dir: str) -> str:
    return os.path.join(os.path.abspath(checkpoint_dir), "snapshots")


def snapshot_records(checkpoint_dir: str, *, verify: bool) -> list[dict[str, Any]]:
    """One ``snapshots --json`` record per committed snapshot, oldest first.

    Snapshots whose manifest is missing or unreadable are included as invalid rows with their
    ``reason``, so an operator sees them. ``verified`` tells whether checksums were checked.
    """
    if not os.path.isdir(_snapshots_dir(checkpoint_dir)):
        return []
    store = LocalSnapshotStore(checkpoint_dir)
    out: list[dict[str, Any]] = []
    for info in store.list():
        checked = info if info.valid is False else store.validate(info.step, verify_checksums=verify)
        record = checked.to_json()
        if record.get("reason") is None:
            record.pop("reason", None)
        record["verified"] = verify
        out.append(record)
    return out


def status_document(checkpoint_dir: str, *, clock: Clock) -> dict[str, Any]:
    """The ``status --json`` object: ``state.json`` refreshed with live observations."""
    paths = RunPaths.of(checkpoint_dir)
    state = read_state(paths)
    if state is None:
        raise NoRunState(f"no run found in {paths.checkpoint_dir} (run/state.json is missing)")
    doc: dict[str, Any] = dict(state)
    now = clock.time()
    alive = lock_is_held(paths.lock)
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
            if not alive and node.get("phase") not in TERMINAL_PHASES:
                node["phase"] = "unknown"
    doc["nodes"] = nodes
    if os.path.isdir(_snapshots_dir(checkpoint_dir)):
        listed = LocalSnapshotStore(checkpoint_dir).list()
        usable = [i.step for i in listed if i.valid is not False]
        doc["newest_local_step"] = max(usable) if usable else None
    for key in ("newest_remote_step", "mirror_lag_steps", "resumed_from_step", "last_failure"):
        doc.setdefault(key, None)
    return doc


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


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
        "last_failure",
    )
    width = max(len(k) for k in keys)
    lines = [f"{k:<{width}}  {_cell(doc.get(k))}" for k in keys]
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
    checked = "checksums verified" if records[0].get("verified") else "sizes checked, not checksums"
    lines.append(f"({checked})")
    return "\n".join(lines)
