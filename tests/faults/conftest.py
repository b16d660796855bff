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
