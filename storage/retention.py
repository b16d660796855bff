"""Retention: which committed snapshots may be deleted.

Pure logic over `SnapshotInfo` lists so it can be tested exhaustively. Keep-last-K, keep-every-N
and keep-best-K (by a metric recorded in the manifest) are separate rules; a snapshot survives if
any rule keeps it. Keep-best ranks by the metric and mode the training script declared once
(``Checkpointer(best=BestPolicy(...))``), which every manifest records under ``metadata["best"]``;
an explicit ``best_metric`` overrides that (API callers and tests; the CLI has no such flag). Whatever the rules say, the newest valid snapshot and every protected step
(in flight, not yet mirrored) are never deleted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from storage.tier import SnapshotInfo

#: The manifest metadata key where the trainer records its declared best metric and mode
#: (``trainer.exports.MANIFEST_KEY``; storage does not import the trainer).
BEST_KEY = "best"


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Retention rules; all None/0 means keep everything."""

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int = 0
    #: None: rank by the metric the manifests declare (``metadata["best"]``), the usual case.
    best_metric: str | None = None
    #: With an explicit ``best_metric``; None means "max". Ignored for declared metrics.
    best_mode: str | None = "max"

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the newest is always kept)")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError("keep_every must be a positive number of steps")
        if self.keep_best < 0:
            raise ValueError("keep_best must be non-negative")
        if self.best_metric is not None and not self.best_metric:
            raise ValueError("best_metric must be a metric name, or None to use the declared one")
        if self.best_mode is not None and self.best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {self.best_mode!r}")

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_every is not None or self.keep_best > 0


def _metric(info: SnapshotInfo, name: str) -> float | None:
    """The snapshot's finite numeric `metrics[name]`, or None (missing, odd type, NaN)."""
    if info.manifest is None:
        return None
    metrics = info.manifest.metadata.get("metrics")
    if not isinstance(metrics, Mapping):
        return None
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        score = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return score if math.isfinite(score) else None


def _declared(info: SnapshotInfo) -> tuple[str, str] | None:
    """The ``(metric, mode)`` the snapshot's manifest declares for keep-best, or None."""
    if info.manifest is None:
        return None
    best = info.manifest.metadata.get(BEST_KEY)
    if not isinstance(best, Mapping):
        return None
    metric, mode = best.get("metric"), best.get("mode")
    if not isinstance(metric, str) or not metric or mode not in ("max", "min"):
        return None
    return metric, str(mode)


def best_ranking(candidates: Sequence[SnapshotInfo], policy: RetentionPolicy) -> tuple[str, str, bool] | None:
    """``(metric, mode, declared)`` keep-best ranks by; None when nothing names a metric (then
    keep-best keeps nothing: the caller should say so)."""
    if policy.best_metric:
        return policy.best_metric, policy.best_mode or "max", False
    # The newest declaration wins: a script that changed its metric (a resume with
    # --allow-config-change) ranks by what it names now, never by scores of another metric.
    for s in reversed(candidates):
        declared = _declared(s)
        if declared is not None:
            return declared[0], declared[1], True
    return None


def plan_retention(
    snapshots: Sequence[SnapshotInfo],
    policy: RetentionPolicy,
    *,
    protected: Iterable[int] = (),
) -> list[int]:
    """Steps to delete, ascending. Never the newest valid (or unchecked) one, never protected."""
    if not policy.active or not snapshots:
        return []
    keep = set(protected)
    by_step = sorted(snapshots, key=lambda s: s.step)
    # A newer release's snapshot is that release's data (after a downgrade): never ours to prune.
    keep.update(s.step for s in by_step if s.newer_format)
    # Unchecked snapshots might turn out corrupt, so keep the newest *known* valid one as well.
    newest_known = next((s.step for s in reversed(by_step) if s.valid is True), None)
    newest_maybe = next((s.step for s in reversed(by_step) if s.valid is not False), None)
    keep.update(step for step in (newest_known, newest_maybe) if step is not None)
    candidates = [s for s in by_step if s.valid is not False]
    if policy.keep_last is not None:
        keep.update(s.step for s in candidates[-policy.keep_last :])
    if policy.keep_every is not None:
        keep.update(s.step for s in candidates if s.step % policy.keep_every == 0)
    ranking = best_ranking(candidates, policy) if policy.keep_best else None
    if ranking is not None:
        metric, mode, declared = ranking
        scored = [
            (m, s.step)
            for s in candidates
            if (not declared or _declared(s) == (metric, mode))
            and (m := _metric(s, metric)) is not None
        ]
        # Ties go to the later step: it carries more training for the same score.
        scored.sort(key=lambda ms: (ms[0] if mode == "max" else -ms[0], ms[1]))
        keep.update(step for _, step in scored[-policy.keep_best :])
    return [s.step for s in by_step if s.step not in keep]
