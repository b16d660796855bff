"""deploy/kubernetes and deploy/slurm are kept correct by reading (no cluster in CI).

The Kubernetes manifest is parsed and its structure checked; every ``orchestrator ...`` command
in it and in the sbatch script must parse with the real CLI parser using exact flag spellings
(helpers shared with test_deploy_compose), with shell variables replaced by sample values.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deploy_compose import (
    _orchestrator_invocations,
    check_orchestrator_argv,
    check_script_args,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes" / "train.yaml"
SBATCH = REPO / "deploy" / "slurm" / "train.sbatch"

#: Sample values for the shell variables the commands use; an unknown variable fails the test.
SAMPLE_ENV = {
    "JOB_COMPLETION_INDEX": "1",
    "SLURM_NODEID": "1",
    "RDZV_HOST": "node001",
    "CKPT_DIR": "/local/nvme/u/digits",
}
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def _substitute(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        assert name in SAMPLE_ENV, f"command uses ${name}; add a sample value to SAMPLE_ENV"
        return SAMPLE_ENV[name]

    return _VAR.sub(sub, text)


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("Job")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _script_commands(script: str) -> list[list[str]]:
    """argv of every `orchestrator` in a shell script (continuations joined, comments dropped)."""
    text = script.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if re.search(r"(^|[\s/])orchestrator\s", stripped):
            found += _orchestrator_invocations(shlex.split(_substitute(stripped)))
    return found


def k8s_orchestrator_commands() -> list[list[str]]:
    found: list[list[str]] = []
    for value in (_container().get("command") or []) + (_container().get("args") or []):
        found += _script_commands(str(value))
    return found


def sbatch_orchestrator_commands(text: str | None = None) -> list[list[str]]:
    text = SBATCH.read_text() if text is None else text
    # the srun'd script is a single-quoted `bash -c '...'` argument: read its body as a script
    bodies = re.findall(r"bash -c '(.*?)'", text, flags=re.S)
    assert bodies, "no `srun ... bash -c '...'` in the sbatch script"
    found: list[list[str]] = []
    for body in bodies:
        found += _script_commands(body)
    return found


def _flag_value(argv: list[str], flag: str) -> str:
    i = argv.index(flag)
    return argv[i + 1]


# ------------------------------------------------------------------------------ kubernetes


def test_k8s_kinds() -> None:
    kinds = sorted(d["kind"] for d in _docs())
    assert kinds == ["Job", "Secret", "Service"]


def test_k8s_indexed_job_two_nodes() -> None:
    spec = _one("Job")["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    exit75 = [r for r in rules if 75 in r.get("onExitCodes", {}).get("values", [])]
    assert exit75 and exit75[0]["action"] == "Ignore"
    assert exit75[0]["onExitCodes"]["operator"] == "In"
    assert exit75[0]["onExitCodes"]["containerName"] == _container()["name"]


def test_k8s_headless_service_and_rendezvous() -> None:
    svc = _one("Service")
    job = _one("Job")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
    [argv] = k8s_orchestrator_commands()
    host, port = _flag_value(argv, "--rdzv-endpoint").rsplit(":", 1)
    # pod 0 of an Indexed Job is <job>-0, resolvable as <job>-0.<subdomain>
    assert host.split(".")[:2] == [f"{job['metadata']['name']}-0", svc["metadata"]["name"]]
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert int(port) in [p["containerPort"] for p in _container()["ports"]]


def test_k8s_grace_period_exceeds_supervisor_grace() -> None:
    [argv] = k8s_orchestrator_commands()
    grace = float(_flag_value(argv, "--grace"))
    assert _one("Job")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def test_k8s_secret_env_and_volumes() -> None:
    secret = _one("Secret")
    container = _container()
    env = {e["name"]: e for e in container["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    [argv] = k8s_orchestrator_commands()
    ckpt = _flag_value(argv, "--checkpoint-dir")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert ckpt == "/ckpt" and ckpt in mounts
    volumes = {v["name"]: v for v in _one("Job")["spec"]["template"]["spec"]["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    assert "hostPath" in volumes[mounts[ckpt]] or "emptyDir" in volumes[mounts[ckpt]]


def test_k8s_node_rank_from_completion_index() -> None:
    command = _container()["command"]
    assert command[:2] == ["sh", "-c"]
    assert '--node-rank "$JOB_COMPLETION_INDEX"' in command[2]


# ----------------------------------------------------------------------------------- slurm


def test_sbatch_directives() -> None:
    text = SBATCH.read_text()
    directives = set(re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M))
    for d in ("--nodes=2", "--ntasks-per-node=1", "--signal=B:USR1@120", "--requeue"):
        assert d in directives
    assert re.search(r"^trap .*USR1.* USR1$", text, flags=re.M)
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert re.search(r'\[ "\$rc" -eq 75 \]', text)
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text


def test_sbatch_command_uses_slurm_rank_and_first_host() -> None:
    body = re.findall(r"bash -c '(.*?)'", SBATCH.read_text(), flags=re.S)[0]
    assert '--node-rank "$SLURM_NODEID"' in body
    assert '--rdzv-endpoint "$RDZV_HOST:29400"' in body
    [argv] = sbatch_orchestrator_commands()
    assert _flag_value(argv, "--rdzv-endpoint") == "node001:29400"


# -------------------------------------------------------------------- commands vs the CLI


def _all_commands() -> list[tuple[str, list[str]]]:
    return [("k8s", a) for a in k8s_orchestrator_commands()] + [
        ("slurm", a) for a in sbatch_orchestrator_commands()
    ]


def test_each_deployment_has_one_launch() -> None:
    wheres = [w for w, argv in _all_commands() if argv[:1] == ["launch"]]
    assert wheres == ["k8s", "slurm"]


@pytest.mark.parametrize(("where", "argv"), _all_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_commands_use_real_flags(where: str, argv: list[str]) -> None:
    command, script_argv = check_orchestrator_argv(argv)
    assert command == "launch"
    assert script_argv, f"{where}: launch without a script"
    check_script_args(script_argv)
    # the same run on both platforms
    assert _flag_value(argv, "--nodes") == "2"
    assert _flag_value(argv, "--grace") == "60"
    assert _flag_value(argv, "--mirror") == "s3://checkpoints/digits"


@pytest.mark.parametrize("bad", ["--keep-locall", "--grac", "--node_rank"])
def test_a_misspelled_flag_is_caught(bad: str) -> None:
    good = {"--keep-locall": "--keep-local", "--grac": "--grace", "--node_rank": "--node-rank"}[bad]
    text = SBATCH.read_text().replace(good + " ", bad + " ", 1)
    assert text != SBATCH.read_text()
    [argv] = sbatch_orchestrator_commands(text)
    with pytest.raises(AssertionError, match="no option"):
        check_orchestrator_argv(argv)
