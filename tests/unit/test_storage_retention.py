"""Retention: keep rules, protected steps, the newest valid snapshot is never deleted."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import FileEntry, Manifest, RetentionPolicy, SnapshotInfo, plan_retention


def info(step: int, valid: bool | None = None, **metrics: Any) -> SnapshotInfo:
    manifest = Manifest(
        run_id="r",
        step=step,
        epoch=0,
        world_size=1,
        files={"tensors.bin": FileEntry(size=1, checksum="0" * 64)},
        digest="sha256:" + "0" * 64,
        created_at=1.0,
        metadata={"metrics": metrics} if metrics else {},
    )
    return SnapshotInfo(
        step=step, path=f"/x/step-{step:012d}", tier="local", manifest=manifest, valid=valid
    )


def no_manifest(step: int) -> SnapshotInfo:
    return SnapshotInfo(
        step=step, path="/x", tier="local", manifest=None, valid=False, reason="manifest missing"
    )


def survivors(snaps: list[SnapshotInfo], policy: RetentionPolicy, **kw: Any) -> list[int]:
    doomed = plan_retention(snaps, policy, **kw)
    assert doomed == sorted(doomed)
    assert set(doomed) <= {s.step for s in snaps}
    return sorted({s.step for s in snaps} - set(doomed))


ALL_VALID = [info(s, True) for s in (0, 5, 10, 15, 20, 25, 30)]


def test_inactive_policy_keeps_everything() -> None:
    assert not RetentionPolicy().active
    assert plan_retention(ALL_VALID, RetentionPolicy()) == []
    assert plan_retention([], RetentionPolicy(keep_last=1)) == []


def test_keep_last() -> None:
    assert survivors(ALL_VALID, RetentionPolicy(keep_last=1)) == [30]
    assert survivors(ALL_VALID, RetentionPolicy(keep_last=3)) == [20, 25, 30]
    assert survivors(ALL_VALID, RetentionPolicy(keep_last=100)) == [0, 5, 10, 15, 20, 25, 30]


def test_keep_last_is_by_step_not_input_order() -> None:
    shuffled = [ALL_VALID[i] for i in (3, 6, 0, 5, 1, 4, 2)]
    assert survivors(shuffled, RetentionPolicy(keep_last=2)) == [25, 30]
    big = [info(s, True) for s in (10**12, 9, 10, 999_999_999_999)]
    assert survivors(big, RetentionPolicy(keep_last=2)) == [999_999_999_999, 10**12]


def test_keep_every() -> None:
    assert survivors(ALL_VALID, RetentionPolicy(keep_every=10)) == [0, 10, 20, 30]
    # The newest is kept even when it is not a multiple.
    snaps = [info(s, True) for s in (10, 20, 25)]
    assert survivors(snaps, RetentionPolicy(keep_every=10)) == [10, 20, 25]


def test_union_of_rules() -> None:
    snaps = [info(s, True, loss=float(100 - s)) for s in range(0, 31, 5)]
    snaps[1] = info(5, True, loss=-1.0)  # the best loss, at an old step
    policy = RetentionPolicy(
        keep_last=2, keep_every=15, keep_best=1, best_metric="loss", best_mode="min"
    )
    assert survivors(snaps, policy) == [0, 5, 15, 25, 30]


def test_keep_best_max_and_min() -> None:
    snaps = [
        info(10, True, acc=0.5),
        info(20, True, acc=0.9),
        info(30, True, acc=0.7),
        info(40, True, acc=0.1),
        info(50, True, acc=0.3),
    ]
    p_max = RetentionPolicy(keep_best=2, best_metric="acc", best_mode="max")
    assert survivors(snaps, p_max) == [20, 30, 50]  # 50 is the newest valid
    p_min = RetentionPolicy(keep_best=2, best_metric="acc", best_mode="min")
    assert survivors(snaps, p_min) == [40, 50]


def test_keep_best_ties_go_to_the_later_step() -> None:
    snaps = [info(10, True, loss=1.0), info(20, True, loss=1.0), info(30, True, loss=1.0),
             info(40, True, loss=5.0)]
    for mode in ("max", "min"):
        policy = RetentionPolicy(keep_best=1, best_metric="loss", best_mode=mode)
        expected = [30, 40] if mode == "min" else [40]
        assert survivors(snaps, policy) == expected, mode
    two = RetentionPolicy(keep_best=2, best_metric="loss", best_mode="min")
    assert survivors(snaps, two) == [20, 30, 40]


def test_keep_best_missing_or_odd_metric() -> None:
    snaps = [
        info(10, True, loss=0.1),
        info(20, True),  # no metrics at all
        info(30, True, other=0.0),  # a different metric
        info(40, True, loss="low"),  # not a number
        info(50, True, loss=float("nan")),  # not comparable
        info(60, True, loss=True),  # a bool is not a score
        info(65, True, loss=10**400),  # too large for a float
        info(70, True, loss=0.5),
    ]
    policy = RetentionPolicy(keep_best=1, best_metric="loss", best_mode="min")
    assert survivors(snaps, policy) == [10, 70]
    policy2 = RetentionPolicy(keep_best=1, best_metric="loss", best_mode="max")
    assert survivors(snaps, policy2) == [70]


def test_metrics_not_a_mapping_does_not_crash() -> None:
    odd = SnapshotInfo(
        step=10,
        path="/x",
        tier="local",
        manifest=Manifest(
            run_id="r",
            step=10,
            epoch=0,
            world_size=1,
            files={"a": FileEntry(size=1, checksum="0" * 64)},
            digest="sha256:x",
            created_at=1.0,
            metadata={"metrics": [1, 2]},
        ),
        valid=True,
    )
    policy = RetentionPolicy(keep_best=1, best_metric="loss")
    assert survivors([odd, info(20, True, loss=1.0)], policy) == [20]


def test_protected_never_deleted() -> None:
    policy = RetentionPolicy(keep_last=1)
    assert survivors(ALL_VALID, policy, protected={0, 15}) == [0, 15, 30]
    assert survivors(ALL_VALID, policy, protected=iter([5])) == [5, 30]
    assert survivors(ALL_VALID, policy, protected={999}) == [30]
    # Even an invalid snapshot is not deleted while protected (e.g. still being mirrored).
    snaps = [info(10, True), info(20, False)]
    assert survivors(snaps, policy, protected={20}) == [10, 20]


def test_newest_valid_kept_even_if_rules_drop_it() -> None:
    snaps = [info(10, True), info(20, True), info(30, True), info(40, True)]
    policy = RetentionPolicy(keep_every=20)  # would keep 20 and 40 ... and 10, 30 drop
    assert survivors(snaps, policy) == [20, 40]
    policy = RetentionPolicy(keep_every=7)  # keeps no step at all by the rule
    assert survivors(snaps, policy) == [40]
    policy = RetentionPolicy(keep_best=1, best_metric="loss")  # no metrics anywhere
    assert survivors(snaps, policy) == [40]


def test_newest_unchecked_and_newest_known_valid_both_kept() -> None:
    snaps = [info(10, True), info(20, True), info(30, None), info(40, None)]
    assert survivors(snaps, RetentionPolicy(keep_last=1)) == [20, 40]
    snaps = [info(10, None), info(20, None)]
    assert survivors(snaps, RetentionPolicy(keep_last=1)) == [20]


def test_invalid_not_counted_towards_keep_last() -> None:
    snaps = [info(10, True), info(20, True), info(30, True), info(40, False), no_manifest(50)]
    assert survivors(snaps, RetentionPolicy(keep_last=2)) == [20, 30]
    # The newest valid is 30: invalid 40/50 newer than it are not "the newest".
    assert survivors(snaps, RetentionPolicy(keep_last=1)) == [30]
    # Nothing valid at all: nothing is the newest valid, invalid ones go.
    assert survivors([info(1, False), no_manifest(2)], RetentionPolicy(keep_last=1)) == []


def test_keep_every_ignores_invalid() -> None:
    snaps = [info(10, False), info(20, True), info(25, True)]
    assert survivors(snaps, RetentionPolicy(keep_every=10)) == [20, 25]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_last": -1}, "keep_last"),
        ({"keep_every": 0}, "keep_every"),
        ({"keep_every": -5}, "keep_every"),
        ({"keep_best": -1}, "keep_best"),
        ({"keep_best": 2, "best_metric": ""}, "best_metric"),
        ({"keep_best": 1, "best_metric": "loss", "best_mode": "lowest"}, "best_mode"),
        ({"best_mode": "MAX"}, "best_mode"),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        RetentionPolicy(**kwargs)


def test_policy_active() -> None:
    assert RetentionPolicy(keep_last=1).active
    assert RetentionPolicy(keep_every=3).active
    assert RetentionPolicy(keep_best=1, best_metric="m").active
    assert not RetentionPolicy(best_metric="m").active


snapshot_lists = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=200),
        st.sampled_from([True, False, None]),
        st.none() | st.floats(min_value=-10, max_value=10, allow_nan=False),
    ),
    max_size=12,
    unique_by=lambda t: t[0],
).map(
    lambda items: [
        info(s, v) if m is None else info(s, v, loss=m) for s, v, m in items
    ]
)
policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(min_value=1, max_value=5),
    keep_every=st.none() | st.integers(min_value=1, max_value=50),
    keep_best=st.integers(min_value=0, max_value=3),
    best_metric=st.just("loss"),
    best_mode=st.sampled_from(["max", "min"]),
)


@settings(max_examples=300, deadline=None)
@given(snaps=snapshot_lists, policy=policies, protected=st.sets(st.integers(0, 200), max_size=4))
def test_retention_properties(
    snaps: list[SnapshotInfo], policy: RetentionPolicy, protected: set[int]
) -> None:
    doomed = plan_retention(snaps, policy, protected=protected)
    assert doomed == sorted(set(doomed))
    assert not set(doomed) & protected
    steps = {s.step for s in snaps}
    assert set(doomed) <= steps
    known = [s.step for s in snaps if s.valid is True]
    maybe = [s.step for s in snaps if s.valid is not False]
    if known:
        assert max(known) not in doomed
    if maybe:
        assert max(maybe) not in doomed
    if policy.keep_last is not None:
        kept_candidates = sorted(s.step for s in snaps if s.valid is not False)
        assert not set(kept_candidates[-policy.keep_last :]) & set(doomed)
    if policy.keep_every is not None:
        assert not {
            s.step for s in snaps if s.valid is not False and s.step % policy.keep_every == 0
        } & set(doomed)
    # Idempotent: planning again over the survivors deletes nothing more.
    rest = [s for s in snaps if s.step not in doomed]
    assert plan_retention(rest, policy, protected=protected) == []


def test_a_newer_release_snapshot_is_never_pruned() -> None:
    # An invalid snapshot is pruned like any other; one a newer release wrote is not ours.
    newer = replace(no_manifest(40), reason="manifest format version 3 is newer", newer_format=True)
    snaps = [info(10, True), info(20, True), info(30, True), no_manifest(35), newer]
    assert survivors(snaps, RetentionPolicy(keep_last=1)) == [30, 40]
