"""`python -m bench.gpu_check` on a machine where CUDA is unusable: one line, exit 69, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def test_gpu_check_without_cuda_exits_69(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, even on a GPU CI runner
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 69, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no usable CUDA device"), p.stderr
    assert p.stdout == "" and not out.exists()
