"""``orchestrator report``: one self-contained HTML page about a run.

The page needs no network to be viewed: CSS inline, charts as inline SVG drawn with matplotlib
(``Figure`` objects, no pyplot state, text as paths so no font is needed), no script at all.

What it shows, and where each point comes from (heartbeats keep only the latest step, so the
step-vs-time curve is reconstructed from what was recorded with a time):

- per attempt, the measured (step, time) points: the snapshot load (rank 0's journal start
  line: the resume step at the time loading finished), the first completed step
  (``supervisor.progress_resumed``), every snapshot commit still on disk (manifest
  ``created_at``), the newest heartbeat before the attempt ended (``supervisor.attempt_ended``)
  and, for a preemption, the step complete when it was requested; plus one estimated point,
  the attempt's last completed step from the journal (or the emergency snapshot) placed at the
  step interval after the newest measured one. Lines join the points of one attempt (a straight
  line between two points is an interpolation, not a measurement).
- snapshot commits: local manifests' ``created_at``; steps known committed but deleted since
  (``retention.deleted``, ``mirror.queued``, rank 0's journal) placed on the line of the first
  attempt that passed them (interpolated);
  mirrored ones from ``mirror.uploaded`` events (upload finished) and, with ``--mirror``, from
  the remote listing (the manifest's ``created_at``).
- mirror lag: newest committed local step minus newest uploaded step over time (events).
- incidents with their cost (:mod:`orchestrator.goodput`).
"""

from __future__ import annotations

import argparse
import html
import io
import itertools
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from contract.codes import EXIT_FAILED, EXIT_USAGE
from contract.documents import JournalEntry
from contract.paths import RunPaths
from orchestrator import goodput
from orchestrator.goodput import Attempt, Evidence, Summary

_KIND_COLOURS = {
    "crash": "#d62728",
    "hang": "#9467bd",
    "preemption": "#ff7f0e",
    "interrupted": "#8c564b",
    "lost": "#7f7f7f",
}


@dataclass(frozen=True)
class Point:
    """One point of the step-vs-time chart (``time`` relative to the run's start)."""

    attempt: int
    step: int
    time: float
    source: str
    measured: bool


@dataclass(frozen=True)
class Commit:
    """A snapshot commit placed in time."""

    step: int
    time: float
    source: str


@dataclass
class Timeline:
    """Everything the charts draw, times in seconds since the first ``supervisor.started``."""

    origin: float
    points: list[Point]
    commits: list[Commit]
    uploads: list[Commit]
    remote_steps: list[int]
    spans: list[tuple[float, float]]
    incident_spans: list[tuple[str, int, float, float]]
    end: float


def known_snapshot_steps(paths: RunPaths, events: Sequence[Mapping[str, Any]]) -> set[int]:
    """Steps known to have been committed whatever their manifest's fate: those rank 0 journaled
    with component digests, those local retention deleted, those the mirror queued."""
    out: set[int] = set()
    for record in goodput.read_journal(paths):
        if isinstance(record, JournalEntry) and record.components:
            out.add(record.step)
    for e in events:
        name = e.get("event")
        if name == "retention.deleted" and e.get("tier") == "local":
            steps = e.get("steps")
            if isinstance(steps, list):
                out.update(s for s in steps if isinstance(s, int))
        elif name == "mirror.queued" and isinstance(e.get("step"), int):
            out.add(int(e["step"]))
    return out


def _attempt_points(
    a: Attempt, measured: Sequence[tuple[int, float]], interval: float | None
) -> list[tuple[int, float, str, bool]]:
    out: list[tuple[int, float, str, bool]] = []
    if a.loaded_at is not None:
        out.append((a.resume_step or 0, a.loaded_at, "snapshot loaded (journal)", True))
    for step, t in measured:
        if (step, t) == (a.first_step, a.first_step_at):
            source = "first step (progress_resumed)"
        elif (step, t) == (a.end_step, a.last_heartbeat_at):
            source = "last heartbeat (attempt_ended)"
        else:
            source = "snapshot commit (manifest)"
        out.append((step, t, source, True))
    if a.preempt_request_step is not None and a.preempt_at is not None:
        out.append((a.preempt_request_step, a.preempt_at, "preemption requested", True))
    last_step, last_at = goodput._last_step(a, measured, interval)
    known = max((p[0] for p in out), default=None)
    if last_step is not None and last_at is not None and (known is None or last_step > known):
        out.append((last_step, last_at, "last step (journal, estimated time)", False))
    out.sort(key=lambda p: (p[1], p[0]))
    return out


def _interpolate(points: Sequence[Point], step: int) -> float | None:
    """The time of ``step`` on one attempt's line; None outside it."""
    for p, q in itertools.pairwise(points):
        if p.step <= step <= q.step and q.step > p.step:
            return p.time + (q.time - p.time) * (step - p.step) / (q.step - p.step)
    return None


def build_timeline(
    evidence: Evidence,
    summary: Summary,
    *,
    known_steps: set[int] | None = None,
    remote_steps: Sequence[int] = (),
    now: float | None = None,
) -> Timeline:
    """The reconstruction the charts draw (module docstring)."""
    events = evidence.events
    runs = goodput.attempts(events, journal=evidence.journal)
    spans = goodput.launches(events, now=now)
    origin = spans[0].started_at if spans else 0.0
    measured = goodput.measured_points(runs, evidence.snapshots)
    points: list[Point] = []
    by_attempt: dict[int, list[Point]] = {}
    for a in runs:
        for step, t, source, exact in _attempt_points(
            a, measured.get(a.attempt, []), summary.step_interval_s
        ):
            p = Point(a.attempt, step, t - origin, source, exact)
            points.append(p)
            by_attempt.setdefault(a.attempt, []).append(p)
    commits = [Commit(s.step, s.created_at - origin, "manifest") for s in evidence.snapshots]
    on_disk = {s.step for s in evidence.snapshots}
    lines = [sorted(by_attempt[n], key=lambda p: p.step) for n in sorted(by_attempt)]
    for step in sorted((known_steps or set()) - on_disk):
        # Placed on the first attempt that passed the step (a replay does not commit it again).
        placed = [x for line in lines if (x := _interpolate(line, step)) is not None]
        if placed:
            commits.append(Commit(step, placed[0], "deleted since (events, journal); "
                                  "time interpolated"))
    commits.sort(key=lambda c: (c.time, c.step))
    uploads = [
        Commit(int(e["step"]), float(e["time"]) - origin, "mirror.uploaded")
        for e in events
        if e.get("event") == "mirror.uploaded" and isinstance(e.get("step"), int)
        and isinstance(e.get("time"), (int, float))
    ]
    incident_spans: list[tuple[str, int, float, float]] = []
    by_number = {a.attempt: a for a in runs}
    for inc in summary.incidents:
        failed = by_number.get(inc.attempt)
        if failed is None:
            continue
        _, last_at = goodput._last_step(failed, measured.get(failed.attempt, []),
                                        summary.step_interval_s)
        start = last_at if last_at is not None else inc.at
        nxt = by_number.get(inc.next_attempt) if inc.next_attempt is not None else None
        stop = None
        if nxt is not None:
            stop = nxt.loaded_at or nxt.first_step_at or nxt.started_at
        if stop is None:
            stop = inc.at
        if start is not None and stop is not None:
            incident_spans.append((inc.kind, inc.attempt, start - origin, stop - origin))
    end = (spans[-1].ended_at - origin) if spans else 0.0
    return Timeline(
        origin=origin, points=points, commits=commits, uploads=uploads,
        remote_steps=sorted(remote_steps),
        spans=[(s.started_at - origin, s.ended_at - origin) for s in spans],
        incident_spans=incident_spans, end=end,
    )


# -- charts --------------------------------------------------------------------------------


def timeline_figure(tl: Timeline) -> Any:
    """Step vs wall time, incidents shaded, snapshot commits and uploads marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for (_, stop), (start, _) in itertools.pairwise(tl.spans):
        ax.axvspan(stop, start, color="#bbbbbb", alpha=0.5, hatch="//", lw=0)
        ax.text((stop + start) / 2, 0.98, "no supervisor\n(between launches)", ha="center",
                va="top", fontsize=7, transform=ax.get_xaxis_transform())
    labelled: set[str] = set()
    for kind, attempt, start, stop in tl.incident_spans:
        colour = _KIND_COLOURS.get(kind, "#7f7f7f")
        label = f"incident: {kind}" if kind not in labelled else None
        labelled.add(kind)
        ax.axvspan(start, max(stop, start), color=colour, alpha=0.18, lw=0, label=label)
        ax.axvline(start, color=colour, lw=1, ls="--")
        ax.text(start, 0.02, f" {kind} (attempt {attempt})", rotation=90, fontsize=7,
                va="bottom", ha="right", color=colour, transform=ax.get_xaxis_transform())
    attempts = sorted({p.attempt for p in tl.points})
    for n in attempts:
        pts = sorted((p for p in tl.points if p.attempt == n), key=lambda p: (p.time, p.step))
        ax.plot([p.time for p in pts], [p.step for p in pts], "-", lw=1.6, color="#1f77b4")
        exact = [p for p in pts if p.measured]
        guess = [p for p in pts if not p.measured]
        ax.plot([p.time for p in exact], [p.step for p in exact], "o", ms=4, color="#1f77b4",
                label="measured step/time" if n == attempts[0] else None)
        if guess:
            ax.plot([p.time for p in guess], [p.step for p in guess], "o", ms=6, mfc="white",
                    color="#1f77b4", label="estimated (journal step, interval)"
                    if "est" not in labelled else None)
            labelled.add("est")
    if tl.commits:
        listed = [c for c in tl.commits if c.source == "manifest"]
        placed = [c for c in tl.commits if c.source != "manifest"]
        if listed:
            ax.plot([c.time for c in listed], [c.step for c in listed], "s", ms=5,
                    color="#2ca02c", label="snapshot committed (manifest created_at)")
        if placed:
            ax.plot([c.time for c in placed], [c.step for c in placed], "s", ms=5,
                    mfc="white", color="#2ca02c", label="snapshot committed (deleted since; "
                    "time interpolated)")
    if tl.uploads:
        ax.plot([c.time for c in tl.uploads], [c.step for c in tl.uploads], "^", ms=6,
                color="#17becf", label="snapshot mirrored (upload done)")
    ax.set_xlabel("wall time since the first launch (s)")
    ax.set_ylabel("step")
    ax.set_xlim(left=0, right=max(tl.end, 1e-3) * 1.02)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def lag_figure(tl: Timeline) -> Any | None:
    """Mirror lag in steps over time; None without any upload."""
    if not tl.uploads:
        return None
    from matplotlib.figure import Figure

    changes = sorted([(c.time, "local", c.step) for c in tl.commits]
                     + [(u.time, "remote", u.step) for u in tl.uploads])
    local = remote = 0
    xs: list[float] = [0.0]
    ys: list[int] = [0]
    for t, tier, step in changes:
        if tier == "local":
            local = max(local, step)
        else:
            remote = max(remote, step)
        xs.append(t)
        ys.append(max(0, local - remote))
    xs.append(tl.end)
    ys.append(ys[-1])
    fig = Figure(figsize=(11, 2.4), layout="constrained")
    ax = fig.add_subplot()
    ax.step(xs, ys, where="post", color="#17becf")
    ax.set_xlabel("wall time since the first launch (s)")
    ax.set_ylabel("mirror lag (steps)")
    ax.set_xlim(left=0, right=max(tl.end, 1e-3) * 1.02)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return fig


def figure_svg(fig: Any, salt: str) -> str:
    """A figure as an inline ``<svg>`` element (no XML prolog; text as paths, so no font)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


# -- the page ------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.text{text-align:left;max-width:28em;overflow-wrap:anywhere}
.summary td{text-align:left}.note{color:#555;font-size:.85em;max-width:60em}
svg{max-width:100%;height:auto}
"""


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value}{unit}"


def _when(t: float | None, origin: float) -> str:
    if t is None:
        return "-"
    stamp = datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"+{t - origin:.1f} s ({stamp})"


def build_html(
    checkpoint_dir: str,
    *,
    remote_records: Sequence[Mapping[str, Any]] | None = None,
    now: float | None = None,
) -> str:
    """The report page of a checkpoint dir (``remote_records``: ``snapshots --mirror`` rows)."""
    paths = RunPaths.of(checkpoint_dir)
    evidence = goodput.load_evidence(checkpoint_dir)
    summary = goodput.summarize(evidence.events, now=now, journal=evidence.journal,
                                snapshots=evidence.snapshots)
    remote_steps = [int(r["step"]) for r in remote_records or () if r.get("valid") is not False]
    tl = build_timeline(evidence, summary, known_steps=known_snapshot_steps(paths, evidence.events),
                        remote_steps=remote_steps, now=now)
    run_id = next((str(e["run_id"]) for e in evidence.events if e.get("run_id")), "unknown")
    charts = [figure_svg(timeline_figure(tl), "timeline")]
    lag = lag_figure(tl)
    if lag is not None:
        charts.append(figure_svg(lag, "lag"))
    esc = html.escape
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Run report: {esc(run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Run report: {esc(run_id)}</h1>",
        f'<p class="note">Checkpoint dir {esc(paths.checkpoint_dir)}; generated '
        f"{esc(datetime.now(tz=UTC).strftime('%Y-%m-%d %H:%M:%S UTC'))}.</p>",
        "<h2>Goodput</h2>",
        '<table class="summary">',
    ]
    rows = [
        ("goodput", "-" if summary.goodput is None else f"{summary.goodput:.1%}"),
        ("wall time (launches only)", _fmt(summary.wall_s, " s")),
        ("productive", _fmt(summary.productive_s, " s")),
        ("lost to incidents", _fmt(summary.lost_s, " s")),
        ("first start-up", _fmt(summary.startup_s, " s")),
        ("final shutdown", _fmt(summary.shutdown_s, " s")),
        ("between launches (not counted)", _fmt(summary.downtime_between_launches_s, " s")),
        ("step interval (median)", _fmt(summary.step_interval_s, " s")),
        ("launches", str(summary.launches)),
        ("incidents", str(len(summary.incidents))),
    ]
    out += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows]
    out.append("</table>")
    out.append("<h2>Step vs wall time</h2>")
    out.append(charts[0])
    out.append(
        '<p class="note">Filled dots: measured (step, time) pairs (snapshot loaded: rank 0\'s '
        "journal start line; first completed step of an attempt; snapshot manifests still on "
        "disk; the newest heartbeat before an attempt ended; the step complete when a preemption "
        "was requested). Hollow dots: an attempt's last completed step from rank 0's journal or "
        "its emergency snapshot, its time estimated at the median step interval. Lines between "
        "points are interpolations. Squares: snapshot commits (filled: manifest created_at; "
        "hollow: deleted since by retention, placed on the line). Shaded: from an incident's "
        "last completed step to the next attempt's snapshot load; hatched: no supervisor running."
        "</p>"
    )
    out.append("<h2>Mirror</h2>")
    if lag is not None:
        out.append(charts[1])
        out.append('<p class="note">Newest committed local step minus newest uploaded step '
                   "(mirror.uploaded events) over time.</p>")
    else:
        out.append('<p class="note">No upload recorded in this dir\'s events (no --mirror, or '
                   "nothing mirrored yet).</p>")
    if remote_records is not None:
        listed = ", ".join(str(s) for s in tl.remote_steps) or "none"
        out.append(f'<p class="note">Remote tier now holds steps: {esc(listed)}.</p>')
    out.append("<h2>Snapshot commits</h2><table><tr><th>step</th><th>time</th><th>source</th>"
               "</tr>")
    for c in tl.commits:
        out.append(f"<tr><td>{c.step}</td><td>{esc(_when(c.time + tl.origin, tl.origin))}</td>"
                   f'<td class="text">{esc(c.source)}</td></tr>')
    out.append("</table>")
    out.append(_incident_table(summary, tl.origin))
    out.append(
        '<p class="note">Parts as defined in orchestrator/goodput.py: detect = last completed '
        "step to the supervisor seeing the group gone (teardown included, except for a hang); "
        "restart = backoff + relaunch (across launches: the rest of the ending launch and the next "
        "launch's start); start-up + load = next attempt start to its snapshot loaded; replay = "
        "steps replayed x median step interval (estimate); lost = their sum. Time between "
        "launches is not the orchestrator's and is left out of goodput.</p>"
    )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _incident_table(summary: Summary, origin: float) -> str:
    esc = html.escape
    head = ("#", "kind", "attempt", "seen at", "last step", "resumed from", "detect",
            "teardown", "restart", "start-up + load", "steps replayed", "replay", "lost",
            "between launches", "cause")
    parts = [f"<h2>Incidents ({len(summary.incidents)})</h2>",
             '<table class="incidents"><thead><tr>'
             + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for n, inc in enumerate(summary.incidents, 1):
        cause = inc.cause or ""
        if len(cause) > 300:
            cause = cause[:297] + "..."
        cells = (
            str(n), inc.kind, str(inc.attempt), _when(inc.at, origin), _fmt(inc.step),
            _fmt(inc.resume_step), _fmt(inc.detect_s, " s"), _fmt(inc.teardown_s, " s"),
            _fmt(inc.restart_s, " s"), _fmt(inc.startup_load_s, " s"),
            _fmt(inc.steps_replayed), _fmt(inc.replay_s, " s"), _fmt(inc.lost_s, " s"),
            _fmt(inc.downtime_between_launches_s, " s"),
        )
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells)
                     + f'<td class="text">{esc(cause)}</td></tr>')
    parts.append("</tbody></table>")
    return "\n".join(parts)


def save_timeline_png(checkpoint_dir: str, out: str) -> None:
    """The report's timeline chart as a PNG (for docs)."""
    evidence = goodput.load_evidence(checkpoint_dir)
    summary = goodput.summarize(evidence.events, journal=evidence.journal,
                                snapshots=evidence.snapshots)
    paths = RunPaths.of(checkpoint_dir)
    tl = build_timeline(evidence, summary, known_steps=known_snapshot_steps(paths, evidence.events))
    timeline_figure(tl).savefig(out, format="png", dpi=110, metadata={"Software": None})


def main(args: argparse.Namespace) -> int:
    """``orchestrator report``: write the page to ``args.out``; 0, or 2 on bad usage, 1 when the
    mirror cannot be listed or the page cannot be written."""
    from orchestrator.mirror import MirrorUnavailable, call_bounded, error_text, open_remote
    from orchestrator.runstate import lock_is_held
    from orchestrator.settings import load_settings
    from orchestrator.status import remote_snapshot_records
    from storage.errors import StorageError

    directory = str(args.checkpoint_dir)
    if not os.path.isdir(directory):
        print(f"orchestrator report: error: checkpoint dir {directory} does not exist",
              file=sys.stderr)
        return EXIT_USAGE
    if not os.path.exists(RunPaths.of(directory).events):
        print(f"orchestrator report: error: no run in {directory} (run/events.jsonl is missing)",
              file=sys.stderr)
        return EXIT_USAGE
    records: list[dict[str, Any]] | None = None
    if args.mirror is not None:
        try:
            remote = open_remote(args.mirror)
            settings = load_settings()
            records = call_bounded(settings, lambda: remote_snapshot_records(remote, verify=False))
        except (MirrorUnavailable, ValueError) as exc:
            print(f"orchestrator report: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except StorageError as exc:
            print(f"orchestrator report: error: cannot list the mirror: {error_text(exc)}",
                  file=sys.stderr)
            return EXIT_FAILED
    now = time.time() if lock_is_held(RunPaths.of(directory).checkpoint_dir) else None
    page = build_html(directory, remote_records=records, now=now)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, args.out)
    except OSError as exc:
        print(f"orchestrator report: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"report written: {args.out} (one self-contained HTML file; opens offline)",
          file=sys.stderr)
    return 0
