"""deploy/compose is kept correct by reading, since Docker cannot run in CI.

Every ``orchestrator ...`` command in the compose file (and in its README's code blocks) must
parse with the real CLI parser and use only flags it defines, spelled out in full (argparse
would silently accept an abbreviation); the script arguments must be accepted by the example.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml  # pyyaml, pinned in the dev extra

from orchestrator.cli import build_parser
from orchestrator.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
README = COMPOSE_DIR / "README.md"
DOCKERFILE = REPO / "deploy" / "Dockerfile"

_SEPARATORS = {";", "&&", "||", "|", "&"}
_INTERP = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(text: str) -> str:
    """Compose variable interpolation with every variable unset: defaults win, $$ -> $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return m.group(2) or ""

    return _INTERP.sub(sub, text)


def _load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _orchestrator_invocations(tokens: list[str]) -> list[list[str]]:
    """argv (after the program name) of every `orchestrator` in a token list."""
    found = []
    for i, tok in enumerate(tokens):
        if tok == "orchestrator" or tok.endswith("/orchestrator"):
            argv = []
            for t in tokens[i + 1 :]:
                if t in _SEPARATORS:
                    break
                argv.append(t)
            found.append(argv)
    return found


def _shell_lines(text: str) -> list[list[str]]:
    text = text.replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(shlex.split(line, comments=True))
    return lines


def _commands_in_value(value: Any) -> list[list[str]]:
    """Token lists in a compose command/entrypoint (list or string form, scripts included)."""
    if value is None:
        return []
    if isinstance(value, str):
        return _shell_lines(_interpolate(value))
    items = [_interpolate(str(v)) for v in value]
    out = [items]
    for item in items:  # e.g. ["/bin/sh", "-ec", "<script>"]
        if "\n" in item or " " in item:
            out.extend(_shell_lines(item))
    return out


def compose_orchestrator_commands() -> list[tuple[str, list[str]]]:
    found = []
    for name, svc in _load_compose()["services"].items():
        for key in ("entrypoint", "command"):
            for tokens in _commands_in_value(svc.get(key)):
                found += [(f"{name}.{key}", argv) for argv in _orchestrator_invocations(tokens)]
        hc = (svc.get("healthcheck") or {}).get("test")
        if hc:
            for tokens in _commands_in_value(hc):
                found += [(f"{name}.healthcheck", a) for a in _orchestrator_invocations(tokens)]
    return found


def readme_orchestrator_commands() -> list[tuple[str, list[str]]]:
    found = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S)
    for block in blocks:
        for tokens in _shell_lines(block):
            found += [("README", argv) for argv in _orchestrator_invocations(tokens)]
    return found


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if name not in action.choices:
                raise AssertionError(
                    f"unknown subcommand {name!r}; expected one of {sorted(action.choices)}"
                )
            return action.choices[name]
    raise AssertionError("orchestrator parser has no subcommands")


def check_orchestrator_argv(argv: list[str]) -> tuple[str, list[str]]:
    """Raise AssertionError unless argv is a valid orchestrator command line with exact flags.

    Returns (subcommand, script argv) where script argv is [script, *args] for launch."""
    assert argv, "bare `orchestrator` without a subcommand"
    parser = build_parser()
    sub = _subparser(parser, argv[0])
    options = sub._option_string_actions
    rest = argv[1:]
    i = 0
    script: list[str] = []
    while i < len(rest):
        tok = rest[i]
        if tok == "--":
            script = rest[i + 1 :]
            break
        if tok.startswith("-") and tok != "-":
            flag, eq, _ = tok.partition("=")
            assert flag in options, (
                f"`orchestrator {argv[0]}` has no option {flag!r} (exact spelling needed); "
                f"known: {sorted(o for o in options if o.startswith('--'))}"
            )
            takes_value = options[flag].nargs != 0
            i += 1 if (eq or not takes_value) else 2
            continue
        script = rest[i:]
        break
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"orchestrator {shlex.join(argv)}: {err.getvalue().strip()}") from e
    return argv[0], script


def _load_example(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"_compose_check_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_script_args(script_argv: list[str]) -> None:
    script, args = script_argv[0], script_argv[1:]
    path = REPO / script
    assert path.is_file(), f"launch script {script} does not exist in the repository"
    module = _load_example(path)
    if not hasattr(module, "parse_args"):
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            module.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"{script} {shlex.join(args)}: {err.getvalue().strip()}") from e


# ---------------------------------------------------------------------------------- tests


def test_compose_has_an_orchestrator_launch():
    cmds = compose_orchestrator_commands()
    assert [where for where, argv in cmds if argv[:1] == ["launch"]] == ["node.command"]


@pytest.mark.parametrize(
    ("where", "argv"),
    compose_orchestrator_commands() + readme_orchestrator_commands(),
    ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]),
)
def test_orchestrator_commands_use_real_flags(where, argv):
    command, script_argv = check_orchestrator_argv(argv)
    if command == "launch":
        assert script_argv, f"{where}: launch without a script"
        check_script_args(script_argv)


@pytest.mark.parametrize(
    "bad",
    [
        ["launch", "--checkpoint-intervall", "25", "examples/digits_cnn.py"],
        ["launch", "--checkpoint-ev", "25", "examples/digits_cnn.py"],  # an abbreviation
        ["launch", "--keep-remote=x", "examples/digits_cnn.py"],
        ["snapshot", "--checkpoint-dir", "/ckpt"],
        ["status", "--checkpoint-dir", "/ckpt", "--verify"],
    ],
)
def test_checker_rejects_bad_commands(bad):
    with pytest.raises(AssertionError):
        check_orchestrator_argv(bad)


def test_checker_rejects_bad_script_args():
    with pytest.raises(AssertionError, match="--stepz"):
        check_script_args(["examples/digits_cnn.py", "--stepz", "400"])


def test_launch_command_matches_the_documented_deployment():
    svc = _load_compose()["services"]["node"]
    argv = [_interpolate(str(t)) for t in svc["command"]]
    assert argv[0] == "orchestrator"
    ns = build_parser().parse_args(argv[1:])
    assert ns.command == "launch"
    assert ns.nproc_per_node == 2
    assert ns.checkpoint_dir == "/ckpt"
    assert ns.checkpoint_every == "25"  # text: LaunchConfig parses it (contract.interval)
    assert ns.mirror == "s3://checkpoints/digits"
    assert ns.keep_local == 3
    assert ns.keep_remote == 5
    assert ns.script == "examples/digits_cnn.py"
    assert ns.script_args == ["--steps", "400", "--seed", "7"]


def test_services_are_wired():
    doc = _load_compose()
    services = doc["services"]
    assert {"minio", "minio-init", "node"} <= set(services)
    node = services["node"]

    # /ckpt is a named volume
    mounts = {m.split(":")[1]: m.split(":")[0] for m in node["volumes"]}
    assert "/ckpt" in mounts
    assert mounts["/ckpt"] in (doc.get("volumes") or {})

    # the node waits for the bucket, which waits for a healthy MinIO
    assert node["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "healthcheck" in services["minio"]

    # S3 settings from the environment
    env = {k: _interpolate(str(v)) for k, v in node["environment"].items()}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert "${AWS_SECRET_ACCESS_KEY" in str(node["environment"]["AWS_SECRET_ACCESS_KEY"])
    init_env = {k: _interpolate(str(v)) for k, v in services["minio-init"]["environment"].items()}
    assert init_env["AWS_ACCESS_KEY_ID"] == env["AWS_ACCESS_KEY_ID"]
    assert init_env["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]
    # ORCH_* values are valid settings (raises ValueError otherwise)
    load_settings({k: v for k, v in env.items() if k.startswith("ORCH_")})

    # the init container creates the bucket the node mirrors to
    ns = build_parser().parse_args([_interpolate(str(t)) for t in node["command"]][1:])
    bucket = ns.mirror.removeprefix("s3://").split("/", 1)[0]
    script = "\n".join(str(c) for c in services["minio-init"]["command"])
    assert re.search(rf"mc mb\b.*\blocal/{re.escape(bucket)}\b", script), script

    # the build points at the Dockerfile, relative to the context
    build = node["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_dockerfile_installs_cpu_torch_and_examples():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.M)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    assert '-e ".[examples]"' in text
    assert "torch==2.13.0" in (REPO / "pyproject.toml").read_text()
