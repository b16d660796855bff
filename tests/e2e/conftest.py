"""Session fixtures for end-to-end tests: uninterrupted golden runs, computed once.

Every test under tests/e2e is marked ``e2e`` here (whatever its module declares), so that
``pytest -m "not e2e"`` (``make test-fast``) never launches a real worker group.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import harness

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)


def _golden(tmp_path_factory: pytest.TempPathFactory, name: str, *script_args: str) -> dict[int, str]:
    ckpt = tmp_path_factory.mktemp(name)
    # Every snapshot, as the reference (the runs under test keep the default last 3 and more).
    result = harness.launch(ckpt, script_args=script_args, extra_launch=("--keep-local", "all"))
    assert result.rc == 0, f"golden run failed:\n{result.stderr[-4000:]}"
    got = harness.digests(result.snapshots())
    assert max(got) == harness.STEPS and len(got) == harness.STEPS // harness.EVERY, sorted(got)
    return got


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """Digest of every snapshot of an uninterrupted run (no DataLoader workers)."""
    return _golden(tmp_path_factory, "golden")


@pytest.fixture(scope="session")
def golden_workers(tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    """The same with two DataLoader worker processes per rank."""
    return _golden(tmp_path_factory, "golden-workers", "--workers", "2")


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"
