"""Worker-side fault injection: the ``ORCH_FAULTS`` rules, shared with the supervisor.

The parser and injector live in :mod:`storage.faults` (torch-free, so the supervisor's mirror
uses the same rules); this module keeps the trainer's import path.
"""

from storage.faults import POINTS, WORKER_POINTS, FaultInjector, FaultRule, parse_faults

__all__ = ["POINTS", "WORKER_POINTS", "FaultInjector", "FaultRule", "parse_faults"]
