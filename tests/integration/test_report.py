"""``orchestrator report``: the page is self-contained and has the charts and the incidents.

A synthetic checkpoint dir (events of a crash and a preemption, mirror uploads, rank 0's
journal) and the real CLI in a subprocess; no worker group (tests/e2e/test_report.py runs one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_goodput import crash_run, ev, preempted_between_launches

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


class PageParser(HTMLParser):
    """What the tests check of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs = 0
        self.tables: list[str] = []
        self.rows: dict[str, int] = {}
        self.external: list[str] = []
        self.scripts = 0
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "svg":
            self.svgs += 1
        elif tag == "script":
            self.scripts += 1
        elif tag == "link":
            self.external.append(f"<link {values}>")
        elif tag == "table":
            self._table = values.get("class") or f"table{len(self.tables)}"
            self.tables.append(self._table)
            self.rows[self._table] = 0
        elif tag == "tbody" and self._table:
            self._in_body = True
        elif tag == "tr" and self._table and self._in_body:
            self.rows[self._table] += 1
        for key in ("src", "href", "xlink:href"):
            ref = values.get(key)
            if ref and not ref.startswith("#"):
                self.external.append(f"{tag} {key}={ref}")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table, self._in_body = None, False


def parse(page: str) -> PageParser:
    p = PageParser()
    p.feed(page)
    p.close()
    return p


def assert_self_contained(page: str) -> PageParser:
    p = parse(page)
    assert p.external == [], p.external
    assert p.scripts == 0
    for needle in ('src="http', "<script src", "<link href", "@import", "url(http"):
        assert needle not in page, needle
    return p


def synthetic_dir(root: Path) -> Path:
    """Events: a crash (attempt 0), then a preemption ending launch 1 (attempt 1), launch 2."""
    crash = crash_run()[:-2]  # attempt 1 is not finished: it will be preempted
    later = [{**e, "time": e["time"] + 20.0, "attempt": e.get("attempt", 0) + 1}
             if "attempt" in e else {**e, "time": e["time"] + 20.0}
             for e in preempted_between_launches()]
    for e in later:
        if e["event"] == "supervisor.attempt_started" and e["attempt"] == 1:
            e["event"] = "skip"
        if e["event"] == "supervisor.progress_resumed" and e["attempt"] == 1:
            e["event"] = "skip"
    events = crash + [e for e in later[1:] if e["event"] != "skip"]
    events += [ev(12.0, "mirror.uploaded", step=20, seconds=0.3),
               ev(15.0, "mirror.uploaded", step=40, seconds=0.3)]
    events.sort(key=lambda e: e["time"])
    run = root / "run"
    (run / "journal").mkdir(parents=True)
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "state.json").write_text(json.dumps({"run_id": "run-000000000001", "phase": "done",
                                                "attempt": 2}))
    journal = [{"start": True, "run_id": "run-000000000001", "attempt": 0, "rank": 0,
                "resumed_from": 0, "time": 2.9}]
    journal += [{"step": s, "attempt": 0, "fp": {}} for s in range(1, 53)]
    (run / "journal" / "rank-0.jsonl").write_text("".join(json.dumps(j) + "\n" for j in journal))
    return root


def run_report(ckpt: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "report", "--checkpoint-dir", str(ckpt),
         "--out", str(out), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=100,
    )


def test_report_page_is_self_contained_with_charts_and_incidents(tmp_path: Path) -> None:
    ckpt = synthetic_dir(tmp_path / "ckpt")
    out = tmp_path / "report.html"
    p = run_report(ckpt, out)
    assert p.returncode == 0, p.stderr
    page = out.read_text()
    parsed = assert_self_contained(page)
    assert parsed.svgs >= 2, "timeline and mirror-lag charts"
    assert parsed.rows["incidents"] == 2
    assert "crash" in page and "preemption" in page


def test_report_usage_errors(tmp_path: Path) -> None:
    p = run_report(tmp_path / "missing", tmp_path / "r.html")
    assert p.returncode == 2 and "does not exist" in p.stderr
    (tmp_path / "empty").mkdir()
    p = run_report(tmp_path / "empty", tmp_path / "r.html")
    assert p.returncode == 2 and "no run" in p.stderr
    assert not (tmp_path / "r.html").exists()


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_a_headless_browser(tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium/Chrome on PATH (chromium, chromium-browser, google-chrome): "
                    "the page is checked with html.parser only")
    ckpt = synthetic_dir(tmp_path / "ckpt")
    out = tmp_path / "report.html"
    assert run_report(ckpt, out).returncode == 0
    dom = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed: Any = parse(dom.stdout)
    assert parsed.svgs >= 2 and parsed.rows["incidents"] == 2
