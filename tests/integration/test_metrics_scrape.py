"""``launch --metrics-port 0 --metrics-file``: the real supervisor scraped while it runs.

The real ``orchestrator launch`` trains examples/digits_cnn.py on 2 ranks (gloo, CPU), paced by
``--step-delay``, and rank 1 is killed at the end of step 50 so that the worker group is
relaunched once. The port comes from the ``metrics.serving`` line on stderr (JSON logs); the
test scrapes ``/metrics`` throughout and checks that the counters only ever grow, across the
workers' relaunch, and that the textfile holds the end of the run. A second ``launch --force``
on the same dir (a new supervisor) must continue the counters, not restart them.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import harness

pytestmark = pytest.mark.timeout(180)

STEPS = 120
COUNTERS = (
    "orchestrator_steps_completed_total",
    "orchestrator_attempts_total",
    "orchestrator_restarts_total",
    "orchestrator_preemptions_total",
)


def parse(text: str) -> dict[str, float]:
    """Unlabelled view of one run's samples: name (plus ``{phase}``/``{event}``) -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels["node_rank"] == "0" and s.labels["run_id"]
            extra = s.labels.get("phase") or s.labels.get("event") or s.labels.get("state")
            out[s.name if extra is None else f"{s.name}{{{extra}}}"] = s.value
    return out


class Stderr:
    """Reads the supervisor's stderr on a thread (the pipe must never fill) and finds the port."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.port: int | None = None
        self._found = threading.Event()
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)
            if '"metrics.serving"' in line:
                doc = json.loads(line)
                self.port = int(doc["port"])
                self._found.set()
        self._found.set()

    def wait_port(self, timeout: float) -> int:
        self._found.wait(timeout)
        assert self.port is not None, "no metrics.serving line:\n" + "".join(self.lines[-40:])
        return self.port

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def scrape(port: int) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return parse(r.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None  # not yet / no longer serving (the supervisor closes it on its way out)


def test_scrapes_during_a_run_with_a_restart(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    prom = tmp_path / "orch.prom"
    metrics_flags = ("--metrics-port", "0", "--metrics-file", str(prom))
    proc = harness.start(
        ckpt, steps=STEPS, every=20, extra_launch=metrics_flags,
        script_args=("--step-delay", "0.05"), env={"ORCH_FAULTS": "step_end@50:rank=1"},
    )
    err = Stderr(proc)
    scrapes: list[dict[str, float]] = []
    try:
        port = err.wait_port(timeout=60)
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            got = scrape(port)
            if got is not None:
                scrapes.append(got)
            time.sleep(0.2)
        rc = proc.wait(timeout=30)
    finally:
        harness.kill_group(proc)
    log = err.text()
    assert rc == 0, log[-4000:]

    # Scrapes came from both attempts: the server lives in the supervisor, not in the workers.
    attempts_seen = {s.get("orchestrator_attempt") for s in scrapes}
    assert {0.0, 1.0} <= attempts_seen, attempts_seen
    assert any(s.get("orchestrator_phase{running}") == 1 for s in scrapes)
    # Counters never went back, through the workers' relaunch.
    for name in COUNTERS:
        values = [s[name] for s in scrapes]
        assert values == sorted(values), (name, values)
    last = scrapes[-1]
    assert last["orchestrator_restarts_total"] == 1
    assert last["orchestrator_attempts_total"] == 2
    # Steps re-executed after the resume from step 40 do not count twice.
    assert max(s["orchestrator_steps_completed_total"] for s in scrapes) <= STEPS
    rates = [s["orchestrator_steps_per_second"] for s in scrapes if "orchestrator_steps_per_second" in s]
    assert rates and max(rates) > 0
    assert any(s.get("orchestrator_last_snapshot_step", 0) >= 20 for s in scrapes)

    # The textfile holds the end of the run.
    final = parse(prom.read_text())
    assert final["orchestrator_phase{done}"] == 1
    assert final["orchestrator_steps_completed_total"] == STEPS
    assert final["orchestrator_step"] == STEPS
    assert final["orchestrator_last_snapshot_step"] == STEPS
    assert final["orchestrator_last_snapshot_bytes"] > 0
    # rank 0's own measurements of its last snapshot, through its heartbeat
    assert final["orchestrator_snapshot_stall_seconds"] > 0
    assert final["orchestrator_snapshot_write_seconds"] > 0
    assert final["orchestrator_restarts_total"] == 1
    assert final["orchestrator_attempts_total"] == 2
    assert final["orchestrator_events_total{supervisor.attempt_ended}"] == 2
    assert not list(tmp_path.glob("orch.prom.*")), "a temporary textfile was left behind"
    # Goodput: what `status --json` says of the ended run (it rounds to 4 places).
    assert abs(final["orchestrator_goodput_ratio"] - harness.status(ckpt)["goodput"]) < 1e-3

    # A new supervisor on the same dir continues the run's counters (launch --force: the run
    # is done, so it only resumes from its final snapshot).
    again = harness.launch(ckpt, steps=STEPS, every=20, timeout=120,
                           extra_launch=(*metrics_flags, "--force"))
    assert again.rc == 0, again.stderr[-4000:]
    after = parse(prom.read_text())
    assert after["orchestrator_restarts_total"] == 1
    assert after["orchestrator_attempts_total"] == 3
    assert after["orchestrator_steps_completed_total"] == STEPS
    assert after["orchestrator_events_total{supervisor.started}"] == 2
    assert after["orchestrator_phase{done}"] == 1
