"""``python -m bench`` end to end at a tiny size: JSON and markdown written, gates checked.

Timings are not asserted (shared, noisy machines); the harness's contract is: every selected
leg produces a result with its targets and a passing correctness gate, and bad input exits 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
def test_in_process_legs_run_and_gate(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = bench("--legs", "stall,write,overhead", "--sizes", "4M", "--repeats", "1",
                 "--json", str(out), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["errors"] == []
    assert [leg["leg"] for leg in doc["legs"]] == ["stall", "write", "overhead"]
    names = {t["name"] for leg in doc["legs"] for t in leg["targets"]}
    assert names == {"stall_vs_copy", "stall_vs_torch_save", "stall_vs_async_save",
                     "write_vs_dd_direct", "throughput_overhead"}
    for leg in doc["legs"]:
        assert leg["correctness"]["ok"] is True and leg["correctness"]["checked"] >= 2, leg
        assert all(isinstance(t["met"], bool) for t in leg["targets"])
        assert leg["met"] == all(t["met"] for t in leg["targets"])
    assert isinstance(doc["all_met"], bool)
    md = (tmp_path / "r.md").read_text()
    assert "| stall | 4M | stall / memcpy of the state |" in md
    assert doc["machine"]["cores"] == os.cpu_count()


@pytest.mark.parametrize("args", [["--legs", "nope"], ["--sizes", "0"], ["--repeats", "0"]])
@pytest.mark.timeout(60)
def test_bad_input_exits_2(tmp_path: Path, args: list[str]) -> None:
    proc = bench(*args, "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "error:" in proc.stderr
    assert not (tmp_path / "r.json").exists()
