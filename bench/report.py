"""The markdown table of a benchmark run: one row per target, grouped by leg and size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench import curves
from bench.core import fmt


def _stat(v: Mapping[str, Any]) -> str:
    return f"{fmt(v['median'])} [{fmt(v['min'])}-{fmt(v['max'])}] {v['unit']}"


def markdown(doc: Mapping[str, Any], *, chart: str | None = None) -> str:
    """Markdown for a run document as written by ``python -m bench --json``; ``chart``: the
    relative path of its scaling-curves PNG, linked with the curves' table."""
    m = doc["machine"]
    lines = [
        f"Command: `{doc['command']}`  ",
        f"Machine: {m.get('gpu') or 'no GPU'}; {m['cpu']}, {m['cores']} cores, "
        f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB; torch {m['torch']}; device `{doc['device']}`  ",
        f"Date: {doc['date']}; repeats per measurement: {doc['repeats']} (medians, [min-max]).",
    ]
    if doc.get("load_before") is not None:
        lines[-1] += "  "
        lines.append(f"Load average (1/5/15 min) before: {doc['load_before']}, after: "
                     f"{doc.get('load_after', 'n/a')} (a shared machine: other jobs ran beside the bench).")
    for note in doc.get("notes", []):  # annotations added to a run's JSON after it ran
        lines[-1] += "" if lines[-1].endswith("  ") else "  "
        lines.append(f"Note: {note}  ")
    for also in doc.get("also", []):
        lines[-1] += "" if lines[-1].endswith("  ") else "  "
        lines.append(f"Also from: `{also['command']}` on {also['date']} (load before {also.get('load_before')}, "
                     f"after {also.get('load_after')}).  ")
    for skip in doc.get("skipped", []):
        lines[-1] += "  " if not lines[-1].endswith("  ") else ""
        lines.append(f"Skipped: {skip['leg']} {skip['size']}: {skip['reason']}.  ")
    lines += [
        "",
        "| leg | size | target | value | bound | met |",
        "|---|---|---|---|---|---|",
    ]
    for leg in doc["legs"]:
        for t in leg["targets"]:
            value = "n/a" if t["value"] is None else fmt(t["value"])
            lines.append(
                f"| {leg['leg']} | {leg['size']} | {t['meaning']} | {value} | {t['op']} {fmt(t['bound'])} "
                f"| {'yes' if t['met'] else '**no**'} |"
            )
        if not leg["targets"]:
            lines.append(f"| {leg['leg']} | {leg['size']} | (no target) | | | |")
    lines += ["", "Measured values:", ""]
    for leg in doc["legs"]:
        gate = leg["correctness"]
        gate_text = (
            "not checked" if gate["ok"] is None
            else f"{gate['checked']} digest checks {'passed' if gate['ok'] else 'FAILED'}"
        )
        lines.append(f"- **{leg['leg']} {leg['size']}** ({gate_text}):")
        for name, v in leg["values"].items():
            lines.append(f"  - {name}: {_stat(v)}")
        for name, v in leg["scalars"].items():
            lines.append(f"  - {name}: {v}")
        for note in leg["notes"]:
            lines.append(f"  - note: {note}")
    lines += _mirror_slowdown(doc)
    scaling = curves.table(doc)
    if scaling or chart:
        lines += ["", "## Scaling curves", ""]
        if chart:
            lines += [f"![scaling curves]({chart})", ""]
        lines += scaling
    return "\n".join(lines) + "\n"


# The mirror leg's slowdown phases: uploader -> (MB/s of the same tool alone, throughput phase).
_ALONE = {"ours": "ours_MBps", "ours_auto": "ours_MBps", "s5cmd": "s5cmd_MBps", "boto3": "boto3_default_MBps"}


def _mirror_slowdown(doc: Mapping[str, Any]) -> list[str]:
    """One row per mirror leg, size and uploader of its slowdown measurement: the slowdown beside
    the cap (``ours_auto``: the one ORCH_MIRROR_MAX_MBPS=auto converged to) and the MB/s."""
    rows = []
    for leg in doc["legs"]:
        phases = leg["scalars"].get("slowdown_phases") if leg["leg"] == "mirror" else None
        if not isinstance(phases, Mapping):
            continue
        for kind, p in phases.items():
            auto = kind == "ours_auto"
            alone = leg["values"].get(_ALONE.get(kind, ""))
            cores = [p.get("uploader_cores_busy"), p.get("endpoint_cores_busy")]
            rows.append(
                f"| {leg['size']} | {kind} | {_num(p.get('slowdown'))} "
                f"| {(_num(p.get('cap_MBps'), 'unlimited') if auto else '-')} "
                f"| {(_num(p.get('upload_MBps')) if auto else '-')} "
                f"| {'-' if alone is None else fmt(alone['median'])} | {p.get('uploads_completed', '-')} "
                f"| {' / '.join(_num(c) for c in cores)} |"
            )
    if not rows:
        return []
    return [
        "",
        "Mirror leg: training step slowdown while uploading (median step uploading / idle). The cap and "
        "the MB/s while training are measured for `ours_auto` only (ORCH_MIRROR_MAX_MBPS=auto: the median "
        "cap over its measured uploading slices); the others are paused and resumed by SIGSTOP with the "
        "environment's settings. MB/s alone: the same tool in the throughput phase.",
        "",
        "| size | uploader | slowdown | cap MB/s | MB/s while training | MB/s alone | uploads | cores: uploader / endpoint |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _num(x: Any, none: str = "n/a") -> str:
    return none if x is None else fmt(float(x))
