"""Shared machinery of the benchmark harness: statistics, targets, leg results and reports.

Every leg measures our code and its peers on the same bytes in the same run, repeats each
measurement, and reports medians with their spread. A leg's targets are ratios (ours over a peer
or over a hardware limit measured alongside), each with a bound and a ``met`` flag, so that the
JSON answers "did we win, by how much" without anyone re-deriving it. Nothing here asserts on
timings: a missed target is a result to report, not an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

MB = 1_000_000
GB = 1_000_000_000


@dataclass(frozen=True, kw_only=True)
class Stat:
    """Samples of one measured quantity (seconds, MB/s, ...); summarised by the median."""

    unit: str
    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a Stat needs at least one sample")
        if any(not math.isfinite(s) for s in self.samples):
            raise ValueError(f"non-finite sample in {self.samples}")

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the samples."""
        return float(min(self.samples)), float(max(self.samples))

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.spread
        return {
            "unit": self.unit,
            "median": self.median,
            "min": lo,
            "max": hi,
            "n": len(self.samples),
            "samples": list(self.samples),
        }

    def short(self) -> str:
        """``median [min-max] unit`` with a sensible number of digits."""
        lo, hi = self.spread
        return f"{fmt(self.median)} [{fmt(lo)}-{fmt(hi)}] {self.unit}"


def fmt(x: float) -> str:
    """Three significant digits, no scientific notation for the ranges we report."""
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 100:
        return f"{x:.0f}"
    if mag >= 10:
        return f"{x:.1f}"
    if mag >= 1:
        return f"{x:.2f}"
    if mag >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"


@dataclass(frozen=True, kw_only=True)
class Target:
    """``value`` (a ratio, usually) must be ``<=`` or ``>=`` ``bound``."""

    name: str
    value: float
    bound: float
    op: Literal["<=", ">="]
    meaning: str

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"op must be '<=' or '>=', got {self.op!r}")

    @property
    def met(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.bound if self.op == "<=" else self.value >= self.bound

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value if math.isfinite(self.value) else None,
            "bound": self.bound,
            "op": self.op,
            "met": self.met,
            "meaning": self.meaning,
        }


def ratio(a: float, b: float) -> float:
    """a / b; inf when b is zero (a target on it is then not met)."""
    return a / b if b > 0 else math.inf


@dataclass(kw_only=True)
class LegResult:
    """One leg at one size: measured values, targets and the correctness gate."""

    leg: str
    size: str
    size_bytes: int
    values: dict[str, Stat] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    correct: bool | None = None
    checked: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def gate(self, expected: str, actual: str, what: str) -> None:
        """Record one correctness check (a digest of the state at a step against what was saved)."""
        self.checked += 1
        ok = expected == actual
        if not ok:
            self.notes.append(f"CORRECTNESS: {what}: expected {expected}, got {actual}")
        self.correct = ok if self.correct is None else (self.correct and ok)

    def to_json(self) -> dict[str, Any]:
        return {
            "leg": self.leg,
            "size": self.size,
            "size_bytes": self.size_bytes,
            "values": {k: v.to_json() for k, v in self.values.items()},
            "scalars": dict(self.scalars),
            "targets": [t.to_json() for t in self.targets],
            "met": all(t.met for t in self.targets) and self.correct is not False,
            "correctness": {"checked": self.checked, "ok": self.correct},
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def repeat(fn: Callable[[], float], n: int) -> tuple[float, ...]:
    """``n`` samples of a function that returns its own measurement."""
    return tuple(fn() for _ in range(n))


def parse_size(text: str) -> int:
    """``100M``/``1G``/``4G``/``512K``/plain bytes (decimal units) to bytes; ValueError otherwise."""
    t = text.strip().upper().removesuffix("B")
    units = {"K": 1_000, "M": MB, "G": GB}
    try:
        value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise ValueError(f"bad size {text!r}: use e.g. 100M, 1G, 4G") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def size_label(n: int) -> str:
    if n >= GB:
        return f"{n / GB:g}G"
    if n >= MB:
        return f"{n / MB:g}M"
    return f"{n}B"


# -- training state of a given size --------------------------------------------------------


def make_model(size_bytes: int, *, device: str = "cpu", seed: int = 0, width: int = 1024) -> torch.nn.Module:
    """An MLP whose fp32 params + AdamW moments total about ``size_bytes`` (3 x 4 bytes/param)."""
    params = max(width * 4, size_bytes // 12)
    layers = max(1, params // (width * width + width))
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods).to(device)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int = 8) -> float:
    """One real forward/backward/AdamW step on random data; returns the loss."""
    first = next(iter(model.parameters()))
    return step_on(model, optimizer, torch.randn(batch, first.shape[1], device=first.device))


def step_on(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """One forward/backward/optimizer step on ``x`` (the workloads pass deterministic data)."""
    loss = model(x).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in iter_tensors(training_state(model, optimizer)))


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What peers save: ``{"model": ..., "optim": ...}`` state dicts (tensors are live views)."""
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def iter_tensors(obj: Any, path: str = "") -> Iterator[torch.Tensor]:
    for _name, t in iter_named_tensors(obj, path):
        yield t


def iter_named_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            yield from iter_named_tensors(obj[k], f"{path}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from iter_named_tensors(v, f"{path}/{i}")


def tensor_digest(obj: Any) -> str:
    """sha256 over every tensor's path, dtype, shape and bytes: what a correctness gate compares.

    Works on any nesting of dicts/lists, so a peer's save (loaded back) and the live state at the
    save step can be compared whatever container types the peer returns.
    """
    h = hashlib.sha256()
    for name, t in iter_named_tensors(obj):
        c = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{c.dtype}|{tuple(c.shape)}|".encode())
        if c.numel():
            h.update(c.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# -- hardware limits, measured in the same run ----------------------------------------------


def memcpy_seconds(nbytes: int, *, repeats: int = 5) -> Stat:
    """Median time to copy ``nbytes`` between two already-touched host buffers."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in: an arena is reused, so steady state is what counts
    samples = [timed(lambda: np.copyto(dst, src)) for _ in range(repeats)]
    return Stat(unit="s", samples=tuple(samples))


def dd_direct_mbps(directory: str, nbytes: int, *, repeats: int = 3) -> Stat:
    """``dd oflag=direct`` throughput (MB/s) writing ``nbytes`` of zeros in 16 MiB blocks."""
    import subprocess

    block = 16 << 20
    count = max(1, nbytes // block)
    path = os.path.join(directory, "dd-direct.bin")
    samples = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(
                ["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}",
                 "oflag=direct", "conv=fsync"],
                check=True, capture_output=True,
            )
            samples.append(count * block / MB / (time.perf_counter() - started))
            os.unlink(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return Stat(unit="MB/s", samples=tuple(samples))


def direct_write_mbps(directory: str, nbytes: int, *, repeats: int = 3) -> Stat:
    """Raw ``O_DIRECT`` throughput (MB/s) of 16 MiB writes from an aligned in-memory buffer.

    A second, stricter device limit beside ``dd``: no source to read, no hashing, fsync at the end.
    """
    import mmap

    block = 16 << 20
    count = max(1, nbytes // block)
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(b"\x5a" * block)
    view = memoryview(buf)
    path = os.path.join(directory, "direct.bin")
    samples = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
            try:
                for _ in range(count):
                    os.write(fd, view)
                os.fsync(fd)
            finally:
                os.close(fd)
            samples.append(count * block / MB / (time.perf_counter() - started))
            os.unlink(path)
    finally:
        view.release()
        buf.close()
        if os.path.exists(path):
            os.unlink(path)
    return Stat(unit="MB/s", samples=tuple(samples))


def drop_page_cache(path: str) -> bool:
    """Evict ``path``'s files from the page cache (POSIX_FADV_DONTNEED); True if every file was."""
    ok = True
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                ok = False
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                ok = False
            finally:
                os.close(fd)
    return ok


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    with contextlib.suppress(ValueError, OSError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def mem_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


#: Peak resident memory of one leg at one state size: (fixed bytes, bytes per byte of state).
#: Estimated from what each leg holds at once (state + gradients, staging arena, the peers'
#: copies, the read-back state); resume's is its largest job's (``bench.legs.resume._FOOTPRINT``).
#: Measured once: the write leg at 4G held 19.0 GB resident (4.75 x) before its torch.load step,
#: on a 24 GiB machine with 3 GB left (stopped there): hence 6 x for it and for stall.
FOOTPRINT: dict[str, tuple[float, float]] = {
    "stall": (0.5e9, 6.0),
    "write": (0.5e9, 6.0),
    "overhead": (0.5e9, 3.5),
    "audit": (0.5e9, 4.0),
    "mirror": (0.5e9, 3.0),
    "resume": (1.2e9, 7.7),
    "lost": (1.2e9, 7.7),
    "fsdp": (1.0e9, 6.0),
}
#: Share of ``MemAvailable`` a leg may plan to use (the machine runs other things too).
MEMORY_BUDGET = 0.85


def memory_skip(leg: str, size_bytes: int, available: int) -> str | None:
    """Why ``leg`` at ``size_bytes`` must not run with ``available`` bytes free, or None if it fits.

    A leg that would not fit is skipped with this reason recorded, never started: an
    out-of-memory kill would lose the whole run's results, not just that leg's.
    """
    if available <= 0:
        return None  # unknown (not Linux): run it, as before
    fixed, per_byte = FOOTPRINT.get(leg, (0.5e9, 5.0))
    need = fixed + per_byte * size_bytes
    if need <= MEMORY_BUDGET * available:
        return None
    return (f"needs about {need / 2**30:.1f} GiB ({fixed / 1e9:g} GB + {per_byte:g} x state), "
            f"{MEMORY_BUDGET:.0%} of MemAvailable is {MEMORY_BUDGET * available / 2**30:.1f} GiB")


def write_json(path: str, doc: Mapping[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What one ``python -m bench`` run measures."""

    sizes: tuple[int, ...]
    quick: bool
    repeats: int
    workdir: str
    device: str
    legs: tuple[str, ...]
    #: The mirror leg's sweep of our upload's parts in flight (``--part-concurrency``); empty: none.
    part_concurrency: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes must be positive, got {self.sizes}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for but torch sees no GPU")
        if not self.legs:
            raise ValueError("no legs selected")
        if any(c < 1 for c in self.part_concurrency):
            raise ValueError(f"part concurrency must be >= 1, got {self.part_concurrency}")

    def scratch(self, name: str) -> str:
        """A fresh directory under the work dir for one leg (emptied first)."""
        import shutil

        path = os.path.join(self.workdir, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path
