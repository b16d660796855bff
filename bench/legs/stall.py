"""Leg "stall": how long one snapshot blocks the training loop.

Ours (:class:`trainer.Checkpointer`: gather, encode, copy into the reused staging arena, hand to
the writer thread) against synchronous ``torch.save`` + fsync and ``dcp.async_save``, on the same
model+AdamW state. The hardware limit is the time to copy the state's bytes once (host memcpy
between touched buffers; device-to-pinned-host copy on CUDA), measured in the same run. Between
saves the model keeps training, so an async save that read tensors after they were mutated would
fail the correctness gate: every save is read back and its tensors' digest compared with the
digest of the live state taken at its step.
"""

from __future__ import annotations

import torch

from bench import core
from bench.legs import savers


def copy_limit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str, repeats: int) -> core.Stat:
    """Seconds to copy every tensor of the state once into an already-allocated buffer."""
    tensors = list(core.iter_tensors(core.training_state(model, optimizer)))
    if device == "cpu":
        return core.memcpy_seconds(sum(t.numel() * t.element_size() for t in tensors), repeats=repeats)
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]

    def copy_all() -> None:
        for d, s in zip(dst, tensors, strict=True):
            d.copy_(s, non_blocking=True)
        torch.cuda.synchronize()

    def once() -> float:
        torch.cuda.synchronize()
        return core.timed(copy_all)

    once()
    return core.Stat(unit="s", samples=tuple(once() for _ in range(repeats)))


def measure(saver: savers.Saver, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            result: core.LegResult, *, repeats: int, steps_between: int = 2) -> core.Stat:
    """Median stall over ``repeats`` saves after one warm-up save (buffers allocated)."""
    step = 0
    samples = []
    for i in range(repeats + 1):
        core.train_step(model, optimizer)
        step += 1
        expected = core.tensor_digest(core.training_state(model, optimizer))
        saver.save(step)
        for _ in range(steps_between):  # mutate the state while an async save may be writing
            core.train_step(model, optimizer)
            step += 1
        stalled = saver.blocked()
        saver.wait()
        if i > 0:
            samples.append(stalled)
        result.gate(expected, saver.saved_digest(step - steps_between), f"{saver.name} save {i}")
        saver.delete(step - steps_between)
    return core.Stat(unit="s", samples=tuple(samples))


def run(config: core.BenchConfig, size_bytes: int) -> core.LegResult:
    model, optimizer, result, base = savers.prepare(config, size_bytes, "stall")
    nbytes = result.size_bytes
    limit = copy_limit(model, optimizer, config.device, config.repeats)
    result.values["copy_limit_s"] = limit
    makers: dict[str, type[savers.Ours] | type[savers.TorchSave] | type[savers.DcpAsync]] = {
        "ours": savers.Ours, "torch_save": savers.TorchSave, "dcp_async_save": savers.DcpAsync,
    }
    for name, make in makers.items():
        saver = make(model, optimizer, f"{base}/{name}")
        try:
            result.values[f"{name}_s"] = measure(saver, model, optimizer, result, repeats=config.repeats)
        finally:
            saver.close()
    ours = result.values["ours_s"].median
    result.targets += [
        core.Target(name="stall_vs_copy", value=core.ratio(ours, limit.median), bound=1.25, op="<=",
                    meaning="stall / memcpy of the state"),
        core.Target(name="stall_vs_torch_save", value=core.ratio(ours, result.values["torch_save_s"].median),
                    bound=0.12, op="<=", meaning="stall / sync torch.save+fsync"),
        core.Target(name="stall_vs_async_save", value=core.ratio(ours, result.values["dcp_async_save_s"].median),
                    bound=0.5, op="<=", meaning="stall / dcp.async_save"),
    ]
    result.scalars["state_bytes"] = nbytes
    result.notes.append(
        "first save of each tool excluded (allocates staging buffers); ours counts snapshot() plus "
        "optimizer.step()'s wait for the deferred copy; DCP: async_save(no_dist=True) with a "
        "reused DefaultStager (cached storages; pinned/async staging only on CUDA)"
    )
    return result
