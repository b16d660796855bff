"""Layout: step <-> directory name, numeric ordering, junk that must be ignored and never deleted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import LocalSnapshotStore, RetentionPolicy, layout, plan_retention


def _commit(store: LocalSnapshotStore, step: int) -> None:
    w = store.begin(step)
    try:
        w.write_bytes("tensors.bin", step.to_bytes(16, "little") * 8)
        w.commit(run_id="r", epoch=0, world_size=1, digest="sha256:" + "0" * 64)
    except BaseException:
        w.abort()
        raise


@given(st.integers(min_value=0, max_value=10**20))
def test_name_step_round_trip(step: int) -> None:
    name = layout.snapshot_dirname(step)
    assert name.startswith("step-")
    assert layout.parse_committed(name) == step
    assert layout.parse_committed(layout.temp_dirname(step)) is None
    assert layout.parse_temp(layout.temp_dirname(step)) == step
    assert layout.parse_temp(name) is None


def test_dirname_is_twelve_digit_zero_padded() -> None:
    assert layout.snapshot_dirname(0) == "step-000000000000"
    assert layout.snapshot_dirname(25) == "step-000000000025"
    assert layout.snapshot_dirname(10**12) == "step-1000000000000"  # 13 digits: still parses
    assert layout.parse_committed("step-1000000000000") == 10**12


def test_negative_step_rejected() -> None:
    with pytest.raises(ValueError):
        layout.snapshot_dirname(-1)


def test_temp_names_are_unique() -> None:
    assert len({layout.temp_dirname(7) for _ in range(50)}) == 50


@pytest.mark.parametrize(
    "name",
    [
        "step-abc",
        "step-",
        "step",
        ".tmp-x",
        "step-12x",
        "step--1",
        "step-+12",
        "step- 12",
        "step-000000000009\n",  # `$` would accept the trailing newline
        "step-000000000009.bak",
        "xstep-000000000009",
        "STEP-000000000009",
        "step-9",  # not the canonical 12-digit name: path(9) would point elsewhere
        "step-0000000000009",
        "step-\u0663",  # a non-ASCII digit that int() would accept
        "step-\uff19",
        "step-" + "1" * 5000,  # int() refuses this many digits: must be junk, not a crash
        "",
    ],
)
def test_parse_committed_rejects_non_canonical(name: str) -> None:
    assert layout.parse_committed(name) is None


@pytest.mark.parametrize(
    "name", ["tensors.bin", "tree.json", "a", "x.y.z", "shard-00001-of-00002.bin"]
)
def test_safe_filenames(name: str) -> None:
    assert layout.is_safe_filename(name)


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "/abs", "a\\b", ".hidden", "a\x00b", "manifest.json"]
)
def test_unsafe_filenames(name: str) -> None:
    assert not layout.is_safe_filename(name)


def test_listing_orders_numerically_not_by_string_or_mtime(tmp_path: Path) -> None:
    store = LocalSnapshotStore(str(tmp_path))
    steps = [10**12, 999_999_999_999, 100, 10, 9, 0]
    for i, s in enumerate(steps):
        _commit(store, s)
        # Make older steps look newer by mtime: selection must not care.
        os.utime(store.path(s), (1_000_000 + i, 1_000_000 + i))
    assert [i.step for i in store.list()] == sorted(steps)
    assert layout.snapshot_dirname(9) < layout.snapshot_dirname(10)
    # String order would put step 10**12 before step 999999999999: listing must not use it.
    assert layout.snapshot_dirname(10**12) < layout.snapshot_dirname(10**12 - 1)
    newest = store.newest_valid()
    assert newest is not None and newest.step == 10**12


def _make_junk(root: Path, elsewhere: Path) -> list[Path]:
    """Entries in snapshots/ that are not committed snapshots. Returns their paths."""
    junk: list[Path] = []
    for d in ["step-abc", "step-", ".tmp-x", "step-9", "notes", "step-000000000009.old"]:
        (root / d).mkdir()
        (root / d / "manifest.json").write_text("{}")
        junk.append(root / d)
    f = root / "step-000000000003"  # a regular file named like a snapshot
    f.write_bytes(b"not a dir")
    junk.append(f)
    link = root / "step-000000000004"  # a symlink to a perfectly valid snapshot elsewhere
    link.symlink_to(elsewhere)
    junk.append(link)
    dangling = root / "step-000000000005"
    dangling.symlink_to(root / "does-not-exist")
    junk.append(dangling)
    return junk


def test_junk_is_ignored_and_never_deleted(tmp_path: Path) -> None:
    other = LocalSnapshotStore(str(tmp_path / "other"))
    _commit(other, 4)
    store = LocalSnapshotStore(str(tmp_path / "ckpt"))
    _commit(store, 1)
    _commit(store, 2)
    junk = _make_junk(Path(store.root), Path(other.path(4)))

    assert [i.step for i in store.list()] == [1, 2]
    # What is not listed is not a snapshot for any other call either.
    for step in (3, 4, 5):
        assert store.validate(step).valid is False
    newest = store.newest_valid(cleanup=True)
    assert newest is not None and newest.step == 2
    # Retention over what is listed, then deletion of every listed step.
    for step in plan_retention(store.list(), RetentionPolicy(keep_last=1)):
        store.delete(step)
    store.cleanup_abandoned()
    # delete() of a step whose name is occupied by junk (file, symlink) must not remove it.
    for step in (3, 4, 5, 9):
        store.delete(step)
    for step in [i.step for i in store.list()]:
        store.delete(step)
    assert store.list() == []
    assert store.newest_valid(cleanup=True) is None
    for j in junk:
        assert os.path.lexists(j), f"junk {j.name!r} was removed"
    # The symlink target (another store's snapshot) is untouched too.
    assert other.validate(4).valid
