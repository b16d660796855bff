"""``python -m bench --legs fsdp`` at a tiny size: real torchrun, 2 ranks of FSDP2 on gloo.

No timing is asserted: the leg must produce every measured value (positive), its three targets
with a boolean verdict, and pass its correctness gates (ours' manifests equal the live digests;
every resume, ours and ``dcp.load``, on 1 and 2 ranks, restores the saved full state).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bench_run import run_bench


@pytest.mark.timeout(120)
def test_fsdp_leg_runs_and_gates(tmp_path: Path) -> None:
    doc = run_bench(tmp_path, "fsdp", "2M", repeats=1, timeout=110)
    (leg,) = doc["legs"]
    assert leg["leg"] == "fsdp" and leg["size"] == "2M"
    assert leg["size_bytes"] > 0
    for name in ("ours_stall_s", "dcp_async_save_stall_s", "ours_MBps", "dd_MBps", "dcp_save_MBps",
                 "ours_resume_1rank_s", "dcp_load_1rank_s", "ours_resume_2rank_s", "dcp_load_2rank_s",
                 "copy_limit_s", "sha256_MBps"):
        value = leg["values"][name]
        assert value["n"] == 1 and value["median"] > 0, (name, value)
    targets = {t["name"]: t for t in leg["targets"]}
    assert set(targets) == {"fsdp_stall_vs_async_save", "fsdp_write_vs_dd", "fsdp_resume_1rank_vs_dcp_load"}
    for t in targets.values():
        assert t["value"] > 0 and isinstance(t["met"], bool), t
    assert leg["scalars"]["ranks"] == 2 and leg["scalars"]["snapshot_bytes"] >= leg["size_bytes"]
    # 2 stall saves + 2 writes (manifest digests), and per world size 1 resume of each tool + ours' step.
    assert leg["correctness"] == {"checked": 4 + 2 * 3, "ok": True}, leg["notes"]
    md = (tmp_path / "r.md").read_text()
    assert "| fsdp | 2M | FSDP 2 ranks: stall / dcp.async_save |" in md
