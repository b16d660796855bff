"""Leg "audit": what the determinism journal costs a run that never recovers.

Every ``step_done(step, {"loss": ...})`` writes the loss bits to ``run/journal/rank-<R>.jsonl``
(one ``write()``; :mod:`trainer.journal`). Two Checkpointers on the same model run interleaved
blocks of steps, in ``6 x repeats`` rounds with the order rotated: one with the journal, one whose
journal records nothing, and the second again as an A/A control. The journal's cost is the
median over rounds of each round's throughput loss against the no-journal loop; the noise is the
same statistic between the two no-journal loops of a round. The claim ("within noise") holds
when the first is no larger than the second. It is measured at the leg's state size and on a
small model whose steps take a fraction of a millisecond, where a per-step cost shows most (a
few microseconds a step: a ``write()`` and the formatting, slower in the loop than on their own
because the training step has evicted them from the caches). The gate reads the journal back:
the last step is there, and every journalled step holds the exact loss bits the loop computed.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

import trainer
from bench import core
from bench.legs import savers
from contract.documents import JournalEntry, parse_journal_line
from trainer.journal import Journal
from trainer.settings import WorkerSettings

#: Wall time one block of steps should take: long enough that timer and scheduler noise is small.
BLOCK_S = 0.4


class _Unjournalled(Journal):
    """The control: the same Checkpointer, with a journal that records nothing."""

    def record(self, step: int, metrics: Mapping[str, Any] | None, components: Any = None) -> None:
        return None


def _small_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer


def _measure(config: core.BenchConfig, result: core.LegResult, label: str, base: str,
             model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    def checkpointer(name: str) -> trainer.Checkpointer:
        settings = WorkerSettings(checkpoint_dir=f"{base}/{label}-{name}", run_id="bench")
        # every=0: no periodic snapshot, so the loops differ in the journal only.
        return trainer.Checkpointer(trainer.TrainingState(model=model, optimizer=optimizer),
                                    hparams={}, every=0, settings=settings)

    on, off, again = checkpointer("journal"), checkpointer("control"), checkpointer("control-2")
    for ckpt in (off, again):
        ckpt.journal = _Unjournalled(ckpt.paths, rank=0, run_id="bench", attempt=0, config_hash=None)
    step_s = statistics.median(core.timed(lambda: core.train_step(model, optimizer)) for _ in range(10))
    per_block = max(20, round(BLOCK_S / step_s))
    steps = {"journal": 0, "control": 0, "control-2": 0}
    losses: dict[int, float] = {}

    def block(kind: str, ckpt: trainer.Checkpointer) -> float:
        started = time.perf_counter()
        for _ in range(per_block):
            loss = core.train_step(model, optimizer)
            steps[kind] += 1
            ckpt.step_done(steps[kind], {"loss": loss})
            if kind == "journal":
                losses[steps[kind]] = loss
        return per_block / (time.perf_counter() - started)

    kinds = (("journal", on), ("control", off), ("control-2", again))
    rates: dict[str, list[float]] = {k: [] for k, _ in kinds}
    rounds = 6 * config.repeats
    try:
        for r in range(rounds):
            for kind, ckpt in kinds[r % 3 :] + kinds[: r % 3]:
                rates[kind].append(block(kind, ckpt))
    finally:
        for ckpt in (on, off, again):
            ckpt.close()

    # Both generations (the journal rotates at JOURNAL_LIMIT lines): the newest steps, each with
    # the exact loss bits, through the last step the loop ran.
    journalled: dict[int, str] = {}
    for path in (on.paths.journal_old(0), on.paths.journal(0)):
        if not os.path.exists(path):  # no rotation yet
            continue
        with open(path, "rb") as f:
            for line in f:
                entry = parse_journal_line(line)
                if isinstance(entry, JournalEntry):
                    journalled[entry.step] = entry.fp.get("loss", "")
    result.gate(str(steps["journal"]), str(max(journalled, default=0)), f"{label}: last step journalled")
    wrong = [s for s, bits in journalled.items() if losses[s].hex() != bits]
    result.gate("0", str(len(wrong)), f"{label}: steps whose journalled loss bits differ")

    def loss_vs(kind: str) -> list[float]:
        return [1 - core.ratio(x, c) for x, c in zip(rates[kind], rates["control"], strict=True)]

    overhead = statistics.median(loss_vs("journal"))
    noise = statistics.median(abs(d) for d in loss_vs("control-2"))
    for kind, values in rates.items():
        result.values[f"{label}_{kind}_steps_per_s"] = core.Stat(unit="steps/s", samples=tuple(values))
    result.scalars.update({
        f"{label}_step_ms": round(step_s * 1e3, 3),
        f"{label}_steps_per_block": per_block,
        f"{label}_journal_overhead": round(overhead, 5),
        f"{label}_noise": round(noise, 5),
    })
    result.targets.append(core.Target(
        name=f"journal_overhead_{label}", value=overhead, bound=noise, op="<=",
        meaning=f"throughput lost to the determinism journal, {label} ({step_s * 1e3:.2f} ms "
                f"steps); bound: the A/A noise between two journal-free loops",
    ))


def _record_cost_us(base: str) -> float:
    """One ``Journal.record`` on its own (format + write), median of 5 x 20000."""
    from contract.paths import RunPaths

    samples = []
    for trial in range(5):
        journal = Journal(RunPaths.of(f"{base}/record-{trial}"), rank=0, run_id="bench", attempt=0,
                          config_hash=None)
        journal.begin(0)
        metrics = {"loss": 0.123456789}
        started = time.perf_counter()
        for step in range(1, 20001):
            journal.record(step, metrics)
        samples.append((time.perf_counter() - started) / 20000 * 1e6)
        journal.close()
    return statistics.median(samples)


def run(config: core.BenchConfig, size_bytes: int) -> core.LegResult:
    model, optimizer, result, base = savers.prepare(config, size_bytes, "audit")
    _measure(config, result, "state", base, model, optimizer)
    small, small_opt = _small_model()
    _measure(config, result, "small", base, small, small_opt)
    result.scalars["record_us"] = round(_record_cost_us(base), 3)
    return result
