"""The fault suite (issue 13): damaged and hostile inputs, a lost run directory, full and
read-only disks, leaked uploads. One test per fault plus the invariants it protects (the newest
valid snapshot never lost, nothing incomplete or unverified applied, bit-identical when allowed
to finish, every wait bounded, no orphan processes, one supervisor per directory), with real
processes, a real S3 server and tmpfs/loop devices where root allows (skipped with a reason
otherwise).

Every test under tests/faults is marked ``faults`` here, so that ``make test`` runs them and
``make test-fast`` (``-m "not e2e and not faults"``) does not.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.faults)


def supervisor_traceback(stderr: str) -> bool:
    """Whether the supervisor (or a CLI command) died with a traceback: one starts a line of
    its stderr. The ranks' tracebacks reach it only inside their JSON log records."""
    return any(line.startswith("Traceback (most recent call last)") for line in stderr.splitlines())


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """Digest of every snapshot of an uninterrupted digits run (tests.e2e.harness defaults)."""
    from tests.e2e import harness

    ckpt = tmp_path_factory.mktemp("faults-golden")
    result = harness.launch(ckpt, extra_launch=("--keep-local", "all"))
    assert result.rc == 0, f"golden run failed:\n{result.stderr[-4000:]}"
    got = harness.digests(result.snapshots())
    assert max(got) == harness.STEPS, sorted(got)
    return got


def _processes_under(root: Path) -> list[int]:
    """Our live processes whose checkpoint dir (``ORCH_CHECKPOINT_DIR``) is under ``root``."""
    from orchestrator.launcher import find_processes

    prefix = f"ORCH_CHECKPOINT_DIR={root}".encode()
    out = []
    for pid in find_processes({}, present=("ORCH_CHECKPOINT_DIR",)):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(item.startswith(prefix) for item in f.read().split(b"\0")):
                    out.append(pid)
        except OSError:
            continue
    return out


@pytest.fixture(autouse=True)
def no_orphans(tmp_path: Path) -> Iterator[None]:
    """Invariant of every fault test: no process of its runs outlives it (they are killed and
    the test fails, naming them)."""
    yield
    left = _processes_under(tmp_path)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes of the test's runs were left behind: {left}"
