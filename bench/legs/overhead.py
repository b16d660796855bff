"""Leg "overhead": training throughput with a snapshot every N steps against none at all.

N is chosen, in this run, as the interval at which synchronous ``torch.save`` + fsync costs 10%
of throughput (N = save time / (0.1 x step time)). Four loops then run interleaved over blocks of
2N steps, in ``3 x repeats`` rounds with the order rotated: bare (no checkpointing code at all),
the same bare loop again (the A/A control: what two identical loops differ by on this machine,
the floor under which no overhead can be told from noise), ours (``Checkpointer.step_done``
every step, so heartbeats and preemption checks are counted too, a snapshot every N) and
``torch.save`` every N.
Each block ends on a snapshot step; after the clock stops, the block's last snapshot is compared
with the live state's digest (nothing has trained since), so the gate costs the loop nothing.
The overhead is the median over rounds of each round's throughput against that round's bare loop.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import trainer
from bench import core
from bench.legs import savers
from trainer.settings import WorkerSettings


def run(config: core.BenchConfig, size_bytes: int) -> core.LegResult:
    model, optimizer, result, base = savers.prepare(config, size_bytes, "overhead")
    plain = savers.TorchSave(model, optimizer, f"{base}/torch_save")

    step_s = [core.timed(lambda: core.train_step(model, optimizer)) for _ in range(10)]
    step_median = core.Stat(unit="s", samples=tuple(step_s)).median
    # The first saves create and grow files; the loop's saves overwrite warm ones and are faster.
    # Timing those would pick too long an interval (in one run: 47 steps, where torch.save then
    # lost only 5.8% instead of 10%), which flatters every saver, ours included.
    for _ in range(2):
        plain.save(0)
    save_s = [plain.save(0) for _ in range(5)]
    save_median = core.Stat(unit="s", samples=tuple(save_s)).median
    every = max(1, round(save_median / (0.10 * step_median)))
    result.scalars.update(interval_steps=every, step_s=round(step_median, 5), torch_save_s=round(save_median, 4))

    # The worker tunables from the environment (ORCH_SNAPSHOT_NICE=0 measures without the
    # writer's low priority), the rest fixed by the leg.
    settings = dataclasses.replace(
        WorkerSettings.from_env(), checkpoint_dir=f"{base}/ours", run_id="bench"
    )
    result.scalars.update(snapshot_nice=settings.snapshot_nice)
    state = trainer.TrainingState(model=model, optimizer=optimizer)
    ckpt = trainer.Checkpointer(state, hparams={}, every=every, settings=settings)
    step = 0
    rates: dict[str, list[float]] = {"bare": [], "bare_again": [], "ours": [], "torch_save": []}

    def block(kind: str) -> float:
        nonlocal step
        started = time.perf_counter()
        for _ in range(2 * every):
            core.train_step(model, optimizer)
            step += 1
            if kind == "ours":
                ckpt.step_done(step)
            elif kind == "torch_save" and step % every == 0:
                plain.save(step)
        return 2 * every / (time.perf_counter() - started)

    kinds = ("bare", "bare_again", "ours", "torch_save")
    rounds = 3 * config.repeats  # a 1% effect under a +-10% drift of the machine needs samples
    try:
        # Align to a multiple of the interval so every block ends on a snapshot step.
        block("bare")
        for r in range(rounds):
            # No kind always runs first or last.
            for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
                rates[kind].append(block(kind))
                if kind == "ours":
                    ckpt.wait()
                    result.gate(ckpt.live_digest() or "", ckpt.store.read_manifest(step).digest,
                                f"ours snapshot at step {step}")
                elif kind == "torch_save":
                    result.gate(core.tensor_digest(core.training_state(model, optimizer)),
                                plain.saved_digest(step), f"torch.save at step {step}")
                    plain.delete(step - every)
                    plain.delete(step)
    finally:
        ckpt.close()
    for kind, values in rates.items():
        result.values[f"{kind}_steps_per_s"] = core.Stat(unit="steps/s", samples=tuple(values))
    # Each round's ratio to the bare loop of the same round: drift between rounds cancels.
    def paired(kind: str) -> float:
        return statistics.median(
            1 - core.ratio(x, b) for x, b in zip(rates[kind], rates["bare"], strict=True)
        )

    ours_overhead = paired("ours")
    save_overhead = paired("torch_save")
    # The A/A control: the same paired statistic between two identical bare loops, and how far
    # single rounds of it stray (the median absolute value): an overhead this small is noise.
    result.scalars["aa_overhead"] = round(paired("bare_again"), 4)
    result.scalars["aa_round_spread"] = round(statistics.median(
        abs(1 - core.ratio(x, b)) for x, b in zip(rates["bare_again"], rates["bare"], strict=True)
    ), 4)
    bare = result.values["bare_steps_per_s"].median
    result.scalars["torch_save_overhead"] = round(save_overhead, 4)
    result.scalars["ours_overhead_of_medians"] = round(
        1 - core.ratio(result.values["ours_steps_per_s"].median, bare), 4
    )
    result.scalars["rounds"] = rounds
    result.targets.append(core.Target(
        name="throughput_overhead", value=ours_overhead, bound=0.01, op="<=",
        meaning=f"throughput lost, snapshot every {every} steps (torch.save loses {save_overhead:.1%})",
    ))
    return result
