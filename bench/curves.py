"""Scaling curves of a benchmark run: how each cost grows with state size, and mirror throughput
with the number of parts in flight.

Built from the run document only (``python -m bench --json``), so a committed JSON can be
re-drawn: ``python -m bench.curves RUN.json [--out RUN.png]``. The series are:

- per state size (x: the nominal size asked for, GB of model + AdamW state), seconds: our stall (and the two peers'), our
  local write (state bytes / ours_MBps of the write leg), our verified load with a cold and a
  warm page cache (write leg), and SIGKILL-to-first-step resume (resume leg, warm cache);
- per state size, mirror MB/s against our upload's parts in flight (``--part-concurrency``).

A series with fewer than two points is listed in the table but not drawn as a line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from bench.core import GB, fmt, parse_size

#: (label, leg, how to get seconds from a leg's JSON): the time-vs-size curves.
_TIME_SERIES: tuple[tuple[str, str, str], ...] = (
    ("stall (ours)", "stall", "ours_s"),
    ("stall (dcp.async_save)", "stall", "dcp_async_save_s"),
    ("stall (torch.save, sync)", "stall", "torch_save_s"),
    ("local write (ours)", "write", "ours_MBps"),
    ("verified load, cold cache (ours)", "write", "ours_load_cold_s"),
    ("verified load, warm cache (ours)", "write", "ours_load_warm_s"),
    ("torch.load, cold cache", "write", "torch_load_cold_s"),
    ("resume after SIGKILL, warm (ours --warm-spare)", "resume", "ours_spare_warm_s"),
    ("resume after SIGKILL, warm (ours)", "resume", "ours_warm_s"),
    ("resume after SIGKILL, warm (until-torchrun loop)", "resume", "baseline_warm_s"),
)


def _seconds(leg: Mapping[str, Any], key: str) -> float | None:
    v = leg.get("values", {}).get(key)
    if v is None:
        return None
    median = float(v["median"])
    if v.get("unit") == "MB/s":  # a throughput: the time to move this leg's state at that rate
        return float(leg["size_bytes"]) / 1e6 / median if median > 0 else None
    return median


def _nominal_gb(leg: Mapping[str, Any]) -> float:
    """The size asked for (``--sizes``), in GB: legs measure slightly different byte counts of
    the same nominal size (model layout, snapshot metadata), which must share one column."""
    try:
        return parse_size(str(leg["size"])) / GB
    except (KeyError, ValueError):
        return float(leg["size_bytes"]) / GB


def time_series(doc: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """label -> [(state GB, seconds), ...] sorted by size; only series with a point."""
    out: dict[str, list[tuple[float, float]]] = {}
    for label, leg_name, key in _TIME_SERIES:
        points = []
        for leg in doc.get("legs", []):
            if leg.get("leg") != leg_name:
                continue
            s = _seconds(leg, key)
            if s is not None:
                points.append((_nominal_gb(leg), s))
        if points:
            out[label] = sorted(points)
    return out


def concurrency_series(doc: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """mirror size label -> [(parts in flight, median MB/s), ...] from the sweep."""
    out: dict[str, list[tuple[int, float]]] = {}
    for leg in doc.get("legs", []):
        if leg.get("leg") != "mirror":
            continue
        points = []
        for key, v in leg.get("values", {}).items():
            if key.startswith("ours_c") and key.endswith("_MBps"):
                try:
                    points.append((int(key[len("ours_c"):-len("_MBps")]), float(v["median"])))
                except ValueError:
                    continue
        if points:
            out[leg["size"]] = sorted(points)
    return out


def growth(points: list[tuple[float, float]]) -> float | None:
    """Log-log slope between the smallest and the largest size (1.0: linear in the state size)."""
    import math

    if len(points) < 2:
        return None
    (x0, y0), (x1, y1) = points[0], points[-1]
    if x0 <= 0 or y0 <= 0 or x1 <= x0 or y1 <= 0:
        return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def table(doc: Mapping[str, Any]) -> list[str]:
    """Markdown lines: one row per time series (seconds at each size, growth exponent) and one
    per mirror size (MB/s at each concurrency). Empty when the run has neither."""
    ts = time_series(doc)
    cs = concurrency_series(doc)
    if not ts and not cs:
        return []
    lines: list[str] = []
    if ts:
        sizes = sorted({x for pts in ts.values() for x, _ in pts})
        lines += [
            "Scaling with state size (median seconds; growth = log-log slope from the smallest to "
            "the largest size, 1 = linear):",
            "",
            "| series | " + " | ".join(f"{fmt(x)} GB" for x in sizes) + " | growth |",
            "|---|" + "---|" * (len(sizes) + 1),
        ]
        for label, tpts in ts.items():
            by = dict(tpts)
            g = growth(tpts)
            cells = [fmt(by[x]) + " s" if x in by else "" for x in sizes]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if g is None else fmt(g)} |")
        lines.append("")
    if cs:
        conc = sorted({c for pts in cs.values() for c, _ in pts})
        lines += [
            "Mirror upload throughput (ours) by parts in flight (median MB/s):",
            "",
            "| state | " + " | ".join(f"{c} parts" for c in conc) + " |",
            "|---|" + "---|" * len(conc),
        ]
        for size, cpts in cs.items():
            by_c = dict(cpts)
            lines.append(f"| {size} | " + " | ".join(fmt(by_c[c]) if c in by_c else "" for c in conc) + " |")
        lines.append("")
    return lines


def has_curves(doc: Mapping[str, Any]) -> bool:
    return any(len(p) >= 2 for p in time_series(doc).values()) or any(
        len(p) >= 2 for p in concurrency_series(doc).values())


def write_chart(doc: Mapping[str, Any], path: str) -> str | None:
    """Draw the curves into ``path`` (PNG, Agg backend); None (nothing written) without a curve."""
    if not has_curves(doc):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = {k: v for k, v in time_series(doc).items() if len(v) >= 2}
    cs = {k: v for k, v in concurrency_series(doc).items() if len(v) >= 2}
    panels = (1 if ts else 0) + (1 if cs else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.6), squeeze=False)
    col = 0
    if ts:
        ax = axes[0][col]
        col += 1
        for label, tpts in ts.items():
            style = "--" if "peer" in label or "torch" in label or "dcp" in label or "loop" in label else "-"
            ax.plot([x for x, _ in tpts], [y for _, y in tpts], style, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = sorted({x for pts in ts.values() for x, _ in pts})
        ax.set_xticks(sizes, [fmt(x) for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training state (GB, model + AdamW)")
        ax.set_ylabel("seconds (median)")
        ax.set_title("cost vs state size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    if cs:
        ax = axes[0][col]
        for size, cpts in cs.items():
            ax.plot([c for c, _ in cpts], [m for _, m in cpts], marker="o", label=f"state {size}")
        ax.set_xscale("log", base=2)
        conc = sorted({c for pts in cs.values() for c, _ in pts})
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("parts in flight (ORCH_REMOTE_CONCURRENCY)")
        ax.set_ylabel("MB/s (median)")
        ax.set_title("mirror upload vs part concurrency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = doc.get("machine", {})
    fig.suptitle(f"{doc.get('command', '')}\n{m.get('cpu', '?')}, {m.get('cores', '?')} cores; "
                 f"{doc.get('date', '')}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge(doc: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` with ``other``'s legs, skips and errors added and its command listed under
    ``also``: one set of curves from runs made apart (same machine, different sizes)."""
    out = dict(doc)
    for key in ("legs", "skipped", "errors", "notes"):
        out[key] = [*doc.get(key, []), *other.get(key, [])]
    out["also"] = [*doc.get("also", []), {"command": other.get("command"), "date": other.get("date"),
                                          "load_before": other.get("load_before"),
                                          "load_after": other.get("load_after")}]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.curves", description=__doc__.splitlines()[0])
    p.add_argument("json_path")
    p.add_argument("more", nargs="*",
                   help="further runs (e.g. a 4G leg run apart) whose legs and skips join the curves")
    p.add_argument("--out", default=None, help="default: the JSON path with .png")
    p.add_argument("--markdown", default=None,
                   help="also rewrite this run's markdown report (bench.report) with the chart linked")
    args = p.parse_args(argv)
    with open(args.json_path) as f:
        doc = json.load(f)
    for extra in args.more:
        with open(extra) as f:
            other = json.load(f)
        doc = merge(doc, other)
    out = args.out or args.json_path.rsplit(".", 1)[0] + ".png"
    written = write_chart(doc, out)
    if args.markdown:
        import os

        from bench import report

        rel = os.path.relpath(written, os.path.dirname(args.markdown) or ".") if written else None
        with open(args.markdown, "w") as f:
            f.write(report.markdown(doc, chart=rel))
    print("\n".join(table(doc)))
    if written is None:
        print("no curve to draw (one size and no part-concurrency sweep)", file=sys.stderr)
        return 1
    print(f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
