"""ORCH_FAULTS parsing and matching, and the SIGKILL action (in a child process)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from contract.faults import FaultInjector, FaultRule, parse_faults


@pytest.mark.timeout(30)
def test_parse_rules_with_defaults_and_options() -> None:
    rules = parse_faults(" step_end@10 , after_files@40:rank=0, before_rename@5:attempt=2:rank=1,")
    assert rules == (
        FaultRule(point="step_end", step=10, rank=None, attempt=0),
        FaultRule(point="after_files", step=40, rank=0, attempt=0),
        FaultRule(point="before_rename", step=5, rank=1, attempt=2),
    )
    assert parse_faults("") == ()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", ["nowhere@3", "step_end", "step_end@x", "step_end@3:rank",
                                 "step_end@3:color=1", "step_end@3:rank=a", "step_end@-1",
                                 "step_end@3:rank=1:rank=2"])
def test_bad_rules_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_faults(bad)


@pytest.mark.timeout(30)
def test_matching_respects_rank_attempt_and_step() -> None:
    rules = parse_faults("after_commit@20:rank=1,step_end@7")
    assert FaultInjector(rules, rank=1, attempt=0).should_fire("after_commit", 20)
    assert not FaultInjector(rules, rank=0, attempt=0).should_fire("after_commit", 20)
    assert not FaultInjector(rules, rank=1, attempt=1).should_fire("after_commit", 20)
    assert not FaultInjector(rules, rank=1, attempt=0).should_fire("after_commit", 21)
    assert FaultInjector(rules, rank=3, attempt=0).should_fire("step_end", 7)
    FaultInjector(rules, rank=0, attempt=0).point("step_end", 8)  # no rule: returns
    with pytest.raises(ValueError):
        FaultInjector(rules, rank=0, attempt=0).point("nowhere", 8)


@pytest.mark.timeout(60)
def test_matching_point_kills_the_process_with_sigkill() -> None:
    code = (
        "from contract.faults import FaultInjector\n"
        "f = FaultInjector.from_spec('after_staging@3:rank=0', rank=0, attempt=0)\n"
        "f.point('after_staging', 2)\n"
        "print('alive', flush=True)\n"
        "f.point('after_staging', 3)\n"
        "print('survived', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout == "alive\n"
