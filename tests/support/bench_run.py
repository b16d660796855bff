"""Running ``python -m bench`` as a subprocess in tests: one leg at a tiny size, its JSON back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path: Path, leg: str, size: str, *, repeats: int, timeout: float,
              env: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run ``python -m bench --legs LEG --sizes SIZE`` with its scratch under ``tmp_path/w``;
    return the JSON document after checking the exit status and that no leg errored.

    ``env`` is added to this process's environment (one-thread torch, this checkout on the
    path), ``drop`` names variables removed from it."""
    out = tmp_path / "r.json"
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    for name in drop:
        full.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--legs", leg, "--sizes", size, "--repeats", str(repeats),
         "--json", str(out), "--workdir", str(tmp_path / "w")],
        cwd=tmp_path, env=full, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"bench exited {proc.returncode}: {proc.stderr[-3000:]}")
    doc: dict[str, Any] = json.loads(out.read_text())
    if doc["errors"]:
        raise AssertionError(f"bench leg errors: {doc['errors']}")
    return doc
