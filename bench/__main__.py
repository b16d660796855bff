"""``python -m bench``: run the legs, write JSON and a markdown table.

Each run works in a fresh scratch directory, run-* under --workdir (default ./.bench), which
it deletes when it exits (normally, on an error, Ctrl-C or SIGTERM), after killing whatever
process of the run is still alive; --keep-scratch keeps it. The --workdir directory itself is
never deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import shlex
import sys
import time
import traceback
from typing import Any

import structlog

from bench import core, curves, legs, report, scratch

DEFAULT_SIZES = "100M,1G"
QUICK_SIZES = "100M"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"sizes {QUICK_SIZES}, fewer repeats: a few minutes on 2 cores")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated state sizes (default {DEFAULT_SIZES}; 4G optional)")
    p.add_argument("--legs", default=",".join(legs.LEGS),
                   help=f"comma-separated subset of: {', '.join(legs.LEGS)}")
    p.add_argument("--repeats", type=int, default=None, help="samples per measurement (default 5, quick 3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--part-concurrency", default="",
                   help="mirror leg: also time our upload with each of these parts in flight "
                        "(comma-separated, e.g. 1,4,8; default: no sweep)")
    p.add_argument("--workdir", default=None,
                   help="directory on the disk under test; the run's scratch is a new run-* "
                        "directory in it, deleted at exit (the directory itself is kept; "
                        "default: ./.bench)")
    p.add_argument("--keep-scratch", action="store_true",
                   help="keep the run-* scratch directory (snapshots, saves, logs; tens of GB "
                        "for a full run) after exit and print its path")
    p.add_argument("--json", dest="json_path", default="bench-results.json")
    p.add_argument("--markdown", dest="md_path", default=None,
                   help="default: the JSON path with .md")
    p.add_argument("--chart", dest="png_path", default=None,
                   help="the scaling curves' PNG (default: the JSON path with .png; written when "
                        "the run has two sizes or a part-concurrency sweep)")
    return p.parse_args(argv)


def parse_ints(text: str) -> tuple[int, ...]:
    """``"1,4,8"`` -> ``(1, 4, 8)``; ValueError naming the bad item."""
    out = []
    for item in text.split(","):
        if item.strip():
            try:
                out.append(int(item))
            except ValueError:
                raise ValueError(f"bad integer {item.strip()!r} in {text!r}") from None
    return tuple(out)


def quiet_logs() -> None:
    """Our libraries log every snapshot at info; a benchmark wants only warnings and errors."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    try:
        sizes = tuple(core.parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(","))
        selected = tuple(s.strip() for s in args.legs.split(",") if s.strip())
        unknown = [s for s in selected if s not in legs.LEGS]
        if unknown:
            raise ValueError(f"unknown legs {unknown}; choose from {list(legs.LEGS)}")
        config = core.BenchConfig(
            sizes=sizes,
            quick=args.quick,
            repeats=args.repeats if args.repeats is not None else (3 if args.quick else 5),
            workdir="",  # the run's scratch, made once the arguments are known to be good
            device=args.device,
            legs=selected,
            part_concurrency=parse_ints(args.part_concurrency),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with scratch.sigterm_exits(), scratch.run_dir(args.workdir, keep=args.keep_scratch) as workdir:
        return run_legs(args, argv, dataclasses.replace(config, workdir=workdir))


def run_legs(args: argparse.Namespace, argv: list[str] | None, config: core.BenchConfig) -> int:
    """The legs of ``config`` in its scratch dir; the JSON, markdown and chart written."""
    sizes = config.sizes
    doc: dict[str, Any] = {
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": core.machine(),
        "device": config.device,
        "repeats": config.repeats,
        "sizes": list(sizes),
        "part_concurrency": list(config.part_concurrency),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "legs": [],
        "errors": [],
        "skipped": [],
    }
    failed = False
    for name in config.legs:
        try:
            fn = legs.load(name)
        except Exception as exc:  # a leg that cannot even be imported must not lose the others
            failed = True
            doc["errors"].append({"leg": name, "size": None, "error": f"import: {type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()})
            print(f"[bench] {name} cannot be loaded: {exc}", file=sys.stderr, flush=True)
            continue
        for size in sizes:
            reason = core.memory_skip(name, size, core.mem_available())
            if reason is not None:
                doc["skipped"].append({"leg": name, "size": core.size_label(size), "size_bytes": size,
                                       "reason": reason})
                print(f"[bench] {name} {core.size_label(size)} skipped: {reason}", file=sys.stderr, flush=True)
                core.write_json(args.json_path, doc)
                continue
            print(f"[bench] {name} {core.size_label(size)} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                result = fn(config, size)
            except Exception as exc:  # one broken leg must not lose the others' numbers
                failed = True
                doc["errors"].append({"leg": name, "size": size, "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()})
                print(f"[bench] {name} failed: {exc}", file=sys.stderr, flush=True)
                continue
            result.seconds = time.perf_counter() - started
            doc["legs"].append(result.to_json())
            verdict = "met" if doc["legs"][-1]["met"] else "NOT met"
            print(f"[bench] {name} {result.size}: {verdict} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
            core.write_json(args.json_path, doc)  # partial results survive an interrupted run
    doc["all_met"] = not failed and all(leg["met"] for leg in doc["legs"])
    doc["load_after"] = [round(x, 2) for x in os.getloadavg()]
    core.write_json(args.json_path, doc)
    md_path = args.md_path or os.path.splitext(args.json_path)[0] + ".md"
    png_path = args.png_path or os.path.splitext(args.json_path)[0] + ".png"
    chart = curves.write_chart(doc, png_path)  # None when there is no curve to draw
    text = report.markdown(doc, chart=os.path.relpath(chart, os.path.dirname(md_path) or ".") if chart else None)
    with open(md_path, "w") as f:
        f.write(text)
    print(text)
    print(f"[bench] wrote {args.json_path}, {md_path}{' and ' + chart if chart else ''}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
