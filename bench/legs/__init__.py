"""One module per leg. Each exposes ``run(config, size_bytes) -> LegResult``.

Registered in :data:`LEGS` in the order ``python -m bench`` runs them. A leg whose peer is not
installed or cannot run here records that in its notes and leaves the target unmet; it never
silently drops a comparison.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from bench.core import BenchConfig, LegResult

LegFn = Callable[[BenchConfig, int], LegResult]

#: name -> module under bench.legs; also the run order.
LEGS: dict[str, str] = {
    "stall": "bench.legs.stall",
    "write": "bench.legs.write",
    "overhead": "bench.legs.overhead",
    "audit": "bench.legs.audit",
    "mirror": "bench.legs.mirror",
    "resume": "bench.legs.resume",
    "lost": "bench.legs.lost",
    "fsdp": "bench.legs.fsdp",
}


def load(name: str) -> LegFn:
    module = importlib.import_module(LEGS[name])
    fn: LegFn = module.run
    return fn
