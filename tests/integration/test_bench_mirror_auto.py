"""``python -m bench --legs mirror`` at a tiny size, with its ``ours_auto`` slowdown kind.

The mirror leg against the real S3 server (SeaweedFS): every tool's throughput, the slowdown
kinds paused by SIGSTOP (ours, s5cmd, boto3) and ``ours_auto``, our mirror with
``ORCH_MIRROR_MAX_MBPS=auto`` fed the training loop's heartbeats through the supervisor's own
path. 1 s auto windows (the bench's default is 2 s) keep it under a minute. No timing is
asserted (shared, noisy machines): the fields must be there and sane, the cap inside its bounds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench import core, report
from tests.support.bench_run import run_bench


def _positive(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.timeout(300)
def test_mirror_leg_measures_the_auto_cap(tmp_path: Path) -> None:
    doc = run_bench(tmp_path, "mirror", "4M", repeats=1, timeout=270,
                    env={"ORCH_MIRROR_AUTO_WINDOW_S": "1"},
                    drop=("ORCH_MIRROR_AUTO_MIN_MBPS", "ORCH_MIRROR_MAX_MBPS"))
    (leg,) = doc["legs"]
    assert leg["leg"] == "mirror" and leg["size"] == "4M"
    assert leg["correctness"]["ok"] is True, leg["notes"]
    scalars, values = leg["scalars"], leg["values"]

    # The existing kinds and fields are still there.
    assert {t["name"] for t in leg["targets"]} == {"ours_vs_s5cmd", "ours_vs_boto3_default", "ours_vs_raw_put",
                                                   "step_slowdown"}
    for name in ("step_s_idle", "step_s_mirroring", "step_s_boto3_uploading"):
        assert values[name]["n"] >= 1 and values[name]["median"] > 0, name
    phases = scalars["slowdown_phases"]
    assert {"ours", "boto3", "ours_auto"} <= set(phases)
    for kind in ("ours", "boto3"):
        assert set(phases[kind]) == {"slowdown", "uploads_completed", "uploader_cores_busy",
                                     "endpoint_cores_busy", "machine_cores_busy"}, kind
    assert isinstance(scalars["slowdown_control_boto3"], float)

    # ours_auto: the slowdown, the cap it converged to and the throughput under it.
    auto = phases["ours_auto"]
    assert _positive(auto["slowdown"]), auto
    assert auto["window_s"] == 1.0 and auto["cap_floor_MBps"] == 4.0
    for cap in (auto["cap_MBps"], auto["cap_final_MBps"]):
        assert cap is None or (isinstance(cap, float) and cap >= auto["cap_floor_MBps"]), auto  # None: unlimited
    assert _positive(auto["upload_MBps"]), auto
    assert auto["uploads_completed"] >= 1 and auto["busy_slices"] >= 1 and auto["idle_slices"] >= 1, auto
    assert auto["cycles"] >= 1 and auto["steps_timed"] > 0
    assert set(auto["decisions"]) == {"backoff", "raise", "lift"}
    assert sum(auto["decisions"].values()) == len(auto["cap_trajectory"])
    for seconds, action, cap in auto["cap_trajectory"]:
        assert seconds >= 0 and action in auto["decisions"]
        assert cap is None or cap >= auto["cap_floor_MBps"]
    assert set(auto["machine_cores_busy"]) == {"busy", "idle"}
    assert scalars["slowdown_ours_auto"] == auto["slowdown"]
    assert scalars["ours_auto_cap_MBps"] == auto["cap_MBps"]
    assert scalars["ours_auto_upload_MBps"] == auto["upload_MBps"]
    assert "ORCH_MIRROR_AUTO_WINDOW_S=1" in scalars["slowdown_auto_schedule"]
    assert values["step_s_ours_auto_uploading"]["n"] == auto["busy_slices"]
    assert values["step_s_ours_auto_idle"]["n"] == auto["idle_slices"]

    md = (tmp_path / "r.md").read_text()
    assert "| 4M | ours | " in md and "| 4M | ours_auto | " in md


@pytest.mark.timeout(30)
def test_report_puts_the_auto_cap_beside_the_slowdown() -> None:
    leg = core.LegResult(leg="mirror", size="100M", size_bytes=10**8)
    leg.values["ours_MBps"] = core.Stat(unit="MB/s", samples=(50.0,))
    leg.scalars["slowdown_phases"] = {
        "ours": {"slowdown": 1.3, "uploads_completed": 4, "uploader_cores_busy": 0.1,
                 "endpoint_cores_busy": 0.45, "machine_cores_busy": {"busy": 1.6, "idle": 1.0}},
        "ours_auto": {"slowdown": 1.02, "uploads_completed": 3, "uploader_cores_busy": 0.03,
                      "endpoint_cores_busy": 0.1, "machine_cores_busy": {"busy": 1.2, "idle": 1.0},
                      "cap_MBps": 6.25, "upload_MBps": 6.1},
    }
    doc = {"command": "python -m bench", "date": "d", "device": "cpu", "repeats": 3,
           "machine": core.machine(), "legs": [leg.to_json()]}
    text = report.markdown(doc)
    assert "| 100M | ours | 1.30 | - | - | 50.0 | 4 | 0.100 / 0.450 |" in text
    assert "| 100M | ours_auto | 1.02 | 6.25 | 6.10 | 50.0 | 3 | 0.030 / 0.100 |" in text
    leg.scalars["slowdown_phases"]["ours_auto"]["cap_MBps"] = None  # the cap was lifted
    assert "| 100M | ours_auto | 1.02 | unlimited | 6.10 |" in report.markdown({**doc, "legs": [leg.to_json()]})
