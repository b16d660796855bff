"""The scaling curves (bench/curves.py), the memory skip and --part-concurrency of python -m bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as bench_main
from bench import core, curves, legs, report

pytestmark = pytest.mark.timeout(60)


def stat(median: float, unit: str = "s") -> dict[str, Any]:
    return {"unit": unit, "median": median, "min": median, "max": median, "n": 1, "samples": [median]}


def leg(name: str, size: str, size_bytes: int, **values: dict[str, Any]) -> dict[str, Any]:
    return {"leg": name, "size": size, "size_bytes": size_bytes, "values": values, "scalars": {},
            "targets": [], "met": True, "correctness": {"checked": 1, "ok": True}, "notes": [], "seconds": 1.0}


def doc() -> dict[str, Any]:
    return {
        "command": "python -m bench --sizes 100M,1G", "date": "2026-12-01", "device": "cpu", "repeats": 2,
        "machine": {"cpu": "x", "cores": 2, "memory_bytes": 2**34, "torch": "2"},
        "load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 2.0, 2.0],
        "skipped": [{"leg": "stall", "size": "4G", "size_bytes": 4 * core.GB, "reason": "needs 20 GiB"}],
        "legs": [
            leg("stall", "100M", 100_000_000, ours_s=stat(0.01)),
            leg("stall", "1G", 1_000_000_000, ours_s=stat(0.1)),
            leg("write", "100M", 100_000_000, ours_MBps=stat(500.0, "MB/s"), ours_load_cold_s=stat(0.5)),
            leg("write", "1G", 1_000_000_000, ours_MBps=stat(500.0, "MB/s"), ours_load_cold_s=stat(5.0)),
            leg("mirror", "1G", 1_000_000_000, ours_MBps=stat(100.0, "MB/s"), ours_c1_MBps=stat(40.0, "MB/s"),
                ours_c8_MBps=stat(120.0, "MB/s")),
        ],
        "errors": [],
    }


def test_series_growth_and_table() -> None:
    d = doc()
    ts = curves.time_series(d)
    assert ts["stall (ours)"] == [(0.1, 0.01), (1.0, 0.1)]
    assert ts["local write (ours)"] == [(0.1, 0.2), (1.0, 2.0)]  # bytes / MB/s
    assert curves.growth(ts["stall (ours)"]) == pytest.approx(1.0)
    assert curves.growth([(1.0, 1.0)]) is None
    assert curves.concurrency_series(d) == {"1G": [(1, 40.0), (8, 120.0)]}
    text = "\n".join(curves.table(d))
    assert "| stall (ours) | 0.010 s | 0.100 s | 1.00 |" in text and "| 1G | 40.0 | 120 |" in text
    assert curves.table({"legs": []}) == []


def test_chart_and_markdown(tmp_path: Path) -> None:
    png = curves.write_chart(doc(), str(tmp_path / "c.png"))
    assert png is not None and Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = {**doc(), "legs": doc()["legs"][:1]}
    assert curves.write_chart(single, str(tmp_path / "none.png")) is None
    md = report.markdown(doc(), chart="c.png")
    assert "![scaling curves](c.png)" in md and "Skipped: stall 4G: needs 20 GiB" in md
    assert "before: [1.0, 1.0, 1.0]" in md


def test_memory_skip() -> None:
    assert core.memory_skip("stall", 100_000_000, 20 * 2**30) is None
    reason = core.memory_skip("stall", 4 * core.GB, 16 * 2**30)
    assert reason is not None and "MemAvailable" in reason
    assert core.memory_skip("resume", 4 * core.GB, 0) is None  # unknown: run as before


def test_main_skips_what_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[Any] = []
    monkeypatch.setattr(core, "mem_available", lambda: 2**30)
    monkeypatch.setattr(legs, "load", lambda name: lambda c, s: ran.append((name, s)))
    out = tmp_path / "r.json"
    rc = bench_main.main(["--legs", "stall", "--sizes", "4G", "--part-concurrency", "1,4",
                          "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert rc == 0 and ran == []
    d = json.loads(out.read_text())
    assert d["skipped"][0]["leg"] == "stall" and d["part_concurrency"] == [1, 4]
    assert "Skipped: stall 4G" in (tmp_path / "r.md").read_text()
    assert bench_main.main(["--part-concurrency", "1,x", "--json", str(out)]) == 2


def test_merge_runs_made_apart(tmp_path: Path) -> None:
    big = {**doc(), "command": "python -m bench --sizes 4G", "skipped": [],
           "legs": [leg("stall", "4G", 4 * core.GB, ours_s=stat(0.4))]}
    merged = curves.merge(doc(), big)
    assert curves.time_series(merged)["stall (ours)"][-1] == (4.0, 0.4)
    assert "Also from: `python -m bench --sizes 4G`" in report.markdown(merged)
    (tmp_path / "a.json").write_text(json.dumps(doc()))
    (tmp_path / "b.json").write_text(json.dumps(big))
    assert curves.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--markdown", str(tmp_path / "a.md")]) == 0
    assert (tmp_path / "a.png").exists() and "![scaling curves](a.png)" in (tmp_path / "a.md").read_text()
