"""Leg "mirror": upload throughput of a committed snapshot to S3, and what mirroring costs training.

One SeaweedFS server (``weed mini`` on loopback, `tests.support.s3server.S3Server`) is the
endpoint for every tool. A real committed local snapshot of about the leg's size is taken with
``trainer.Checkpointer`` (its digest gated against the live state). Then, ``repeats`` times and in
alternating tool order, each tool uploads the same bytes into a fresh key prefix of the same
bucket: ours through the supervisor's own code path (``orchestrator.mirror.open_remote`` with the
default settings, driven by a ``Mirror`` thread exactly as ``orchestrator launch --mirror`` does;
timed from ``notify`` until ``flush`` returns, manifest committed), boto3 ``upload_file`` with the
default and with a tuned ``TransferConfig``, ``s5cmd cp`` (whole-process wall time) and the
endpoint's raw PUT ceiling (a multipart upload of bytes already in memory from N threads over
pre-signed URLs: no disk read, no checksum, no payload signing). Every upload of ours is validated
remotely with full checksum verification and its manifest digest gated. Last, training steps of a
small model (one intra-op thread, like ``OMP_NUM_THREADS=1`` workers) are timed in ~1 s slices
that alternate between our mirror uploading the snapshot in a loop from a separate process (the
product mirrors from the supervisor, never the worker; with the mirror's own pacing:
``ORCH_MIRROR_NICE`` and ``ORCH_MIRROR_MAX_MBPS`` from the environment) and that process paused
(SIGSTOP); the ratio of the medians is the slowdown, and the same with ``s5cmd`` and with boto3
``upload_file`` (default config) is reported as the controls. CPU time of the client, the
endpoint and the whole machine is recorded beside, because on a small machine the loopback
endpoint and anything else running compete with training for the cores.

After those, ``ours_auto``: the automatic cap (``ORCH_MIRROR_MAX_MBPS=auto``, ``orchestrator.throttle.
AutoCap``). It steers by the training's step rate, learns the idle rate from windows in which the
mirror uploads nothing and needs heartbeats all the time, so SIGSTOP slices would starve it (a
stopped mirror sees no heartbeats, and a stopped upload is not an idle one). Instead:

* the uploader process runs a real ``Mirror`` (its worker thread, pacing, ``--keep-remote 1``) with
  ``ORCH_MIRROR_MAX_MBPS=auto`` and ``ORCH_MIRROR_AUTO_WINDOW_S`` of 2 s (unless the environment
  sets one), and a thread that does what the supervisor's poll does: every ``ORCH_POLL_INTERVAL_S``
  it reads the newest heartbeat (``AttemptProgress.read``) and passes it to
  ``Mirror.note_progress``;
* the bench's training loop never stops: after each step it writes a rank's heartbeat document
  (``run/progress/rank-0.json``, at most one per W/5 s: the product's 1 s heartbeats against its
  5 s windows, scaled to the shorter window W);
* the mirror is idle (nothing to upload, not stopped) or uploads back to back: on "busy" the
  uploader commits a new local snapshot (a hard-linked copy of the leg's snapshot at the next
  step, so each upload sends all of its bytes) and notifies it, and another each time one is
  uploaded; on "idle" it stops adding, and the upload in flight finishes;
* schedule, in windows W: 3 W idle (the baseline), then uploading; the first 6 W of it are not
  measured (the cap falls from unlimited); then 2 cycles of uploading (at least 3 W, to the end of
  the snapshot in flight) and 2 W idle, all measured in ~1 s slices (none within 0.2 s of a
  change; a slice across one is dropped); a budget of 90 s ends it, mid-upload if need be.

Reported beside the slowdown (median step time of the uploading slices / of the idle ones, the
warm-up's included): the cap in force over the uploading slices (median; None: unlimited), the
last cap and every decision, and the MB/s the mirror sent while uploading after the convergence
(bytes through its token bucket / seconds, over the uploading after the convergence).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import math
import os
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from bench import core

MiB = 1 << 20
_STEP = 1  # the snapshot's training step
_TOOLS = ("ours", "boto3_default", "boto3_tuned", "s5cmd", "raw_put")
_PEER_CONCURRENCY = 16  # boto3 tuned, s5cmd and the raw ceiling: parts in flight
_STEP_TARGET_S = 0.03  # the slowdown model is sized so that one training step takes about this
_TIMEOUT_S = 900.0
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The background mirror of part 4: product modules only (no torch import), the same upload the
# supervisor's mirror thread runs, in a loop (upload, delete, upload, ...) until terminated.
_LOAD_LOOP = """
import logging, sys
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from orchestrator.mirror import Mirror, open_remote
from orchestrator.settings import load_settings
from storage import LocalSnapshotStore
url, checkpoint_dir, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
remote = open_remote(url)
local = LocalSnapshotStore(checkpoint_dir)
# The supervisor mirror's pacing (ORCH_MIRROR_NICE, ORCH_MIRROR_MAX_MBPS from the environment),
# applied to this thread as the mirror applies it to its own worker thread.
class _Events:
    def emit(self, event, **fields): pass
pacing = Mirror(remote=remote, local=local, events=_Events(), settings=load_settings()).pacing
pacing.thread_started()
print("ready", flush=True)
while True:
    remote.upload(local, step, pacing=pacing)
    print("uploaded", flush=True)
    remote.delete(step)
"""

# The "ours_auto" uploader of part 4 (ORCH_MIRROR_MAX_MBPS=auto in its environment): product
# modules only. A real Mirror (worker thread, pacing, AutoCap, --keep-remote 1) and the
# supervisor's poll: every ORCH_POLL_INTERVAL_S the newest heartbeat of the bench's training loop
# (run/progress/rank-0.json, read by AttemptProgress as Supervisor._watch reads it) goes to
# Mirror.note_progress. Commands on stdin: "busy" (from now on a new local snapshot is committed
# and notified each time the previous one is uploaded: the mirror uploads back to back), "idle"
# (no more new snapshots: the one in flight finishes, then "drained"), "mark" (report the bytes
# sent so far). Every new snapshot is a hard-linked copy of the leg's snapshot at the next step
# (its files adopted and its manifest committed at the new step through SnapshotWriter, as a
# sharded snapshot is committed), so each upload sends the full snapshot again. Reports on
# stdout are JSON lines with this process's time.monotonic() (the same clock as the bench's).
_AUTO_LOOP = """
import dataclasses, json, logging, os, sys, threading, time
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from contract.paths import RunPaths
from orchestrator.clock import RealClock
from orchestrator.mirror import Mirror, error_text, open_remote
from orchestrator.progress import AttemptProgress
from orchestrator.settings import load_settings
from storage import LocalSnapshotStore
url, source_dir, source_step, checkpoint_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
settings = load_settings()
source = LocalSnapshotStore(source_dir)
base = source.read_manifest(source_step)
local = LocalSnapshotStore(checkpoint_dir)
out_lock, state_lock = threading.Lock(), threading.Lock()
state = {"busy": False, "next": 1, "local": []}
mirror = None

def say(event, **fields):
    with out_lock:
        print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)

def counters():
    rate = mirror.bucket.rate_bps
    return {"granted": mirror.bucket.granted, "cap_mb_per_s": None if rate is None else rate / 1e6}

def feed():
    step = state["next"]
    state["next"] += 1
    writer = local.begin(step)
    for name, entry in base.files.items():
        os.link(os.path.join(source.path(source_step), name), os.path.join(writer.tmp_path, name))
        writer.adopt(name, entry)
    writer.commit_manifest(dataclasses.replace(base, step=step))
    mirrored = mirror.mirrored_steps()
    for old in [s for s in state["local"] if s in mirrored]:
        local.delete(old)
    state["local"] = [s for s in state["local"] if s not in mirrored] + [step]
    mirror.notify(state["local"])

class Events:
    def emit(self, event, **fields):
        if event == "mirror.throttled":
            say("throttled", **fields)
        elif event == "mirror.uploaded":  # the worker thread, before the next job is picked
            say("uploaded", **fields, **counters())
            with state_lock:
                if state["busy"]:
                    feed()
                else:
                    say("drained", **counters())
        elif event in ("mirror.failed", "mirror.retry"):
            say(event, **{k: str(v) for k, v in fields.items()})

class Quiet:
    def emit(self, event, **fields):
        pass

try:
    mirror = Mirror(remote=open_remote(url), local=local, events=Events(), settings=settings,
                    keep_remote=1)
    mirror.start()
    if not mirror.flush(60.0):
        raise RuntimeError(f"mirror rescan did not finish: {mirror.error}")
    progress = AttemptProgress(paths=RunPaths.of(checkpoint_dir), clock=RealClock(), events=Quiet())
    progress.begin(0, None)
except Exception as exc:
    say("failed", error=error_text(exc))
    sys.exit(1)

def supervise():
    while True:
        time.sleep(settings.poll_interval_s)
        progress.read()
        beat = progress.last_beat
        if beat is not None:
            mirror.note_progress(beat.step, beat.time)

threading.Thread(target=supervise, daemon=True).start()
say("ready", window_s=settings.mirror_auto_window_s, floor_mb_per_s=settings.mirror_auto_min_mbps,
    poll_s=settings.poll_interval_s, auto=mirror.auto is not None)
for line in sys.stdin:
    cmd = line.strip()
    with state_lock:
        if cmd == "busy":
            state["busy"] = True
            feed()
        elif cmd == "idle":
            state["busy"] = False
        say(cmd, **counters())
mirror.close()
"""

# The boto3 control of part 4: upload_file with the default TransferConfig, in a loop.
_BOTO3_LOOP = """
import sys
import boto3
from boto3.s3.transfer import TransferConfig
path, bucket, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = boto3.client("s3")
print("ready", flush=True)
while True:
    client.upload_file(path, bucket, key, Config=TransferConfig())
    print("uploaded", flush=True)
"""


@dataclass(frozen=True, kw_only=True)
class _Snapshot:
    checkpoint_dir: str
    tensors_path: str
    tensors_bytes: int
    total_bytes: int
    digest: str


def _process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) a live process has used so far; 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (s5cmd; not the live server)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class _Span:
    """Wall time of one timed upload, plus the client's and the endpoint's CPU time in it."""

    def __init__(self, server_pid: int | None) -> None:
        self._pid = server_pid
        self._server0 = _process_cpu_s(server_pid)
        self._cpu0 = _own_cpu_s()
        self._wall0 = time.perf_counter()

    def stop(self, into: list[tuple[float, float]], nbytes: int) -> float:
        """Seconds since start; appends (client, endpoint) CPU seconds per GB to ``into``."""
        seconds = time.perf_counter() - self._wall0
        gb = nbytes / core.GB
        into.append(((_own_cpu_s() - self._cpu0) / gb, (_process_cpu_s(self._pid) - self._server0) / gb))
        return seconds


class _Events:
    """The mirror's event sink: keeps what it is told (``mirror.uploaded`` carries its seconds)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [f for e, f in self.events if e == event]


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (the product reads AWS credentials from there)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _peer_part_size(nbytes: int) -> int:
    """Parts for the tuned peers and the ceiling: enough of them to keep 16 in flight, 8-64 MiB."""
    return max(8 * MiB, min(64 * MiB, -(-nbytes // _PEER_CONCURRENCY // MiB) * MiB))


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / core.MB / seconds


def _make_snapshot(config: core.BenchConfig, size_bytes: int, result: core.LegResult) -> _Snapshot:
    """A real committed snapshot (model + AdamW after one step) taken by ``trainer.Checkpointer``."""
    from storage import LocalSnapshotStore
    from trainer import Checkpointer, TrainingState
    from trainer.codec import TENSORS_FILE
    from trainer.settings import WorkerSettings

    checkpoint_dir = os.path.join(config.scratch("mirror"), "ckpt")
    model = core.make_model(size_bytes, device=config.device)
    optimizer = core.make_optimizer(model)
    core.train_step(model, optimizer)
    state = TrainingState(model=model, optimizer=optimizer)
    state.step = _STEP
    ckpt = Checkpointer(state, hparams={}, checkpoint_dir=checkpoint_dir, every=0,
                        run_id="bench-mirror", settings=WorkerSettings())
    try:
        ckpt.snapshot()
        live = ckpt.live_digest()
        ckpt.wait()
    finally:
        ckpt.close()
    store = LocalSnapshotStore(checkpoint_dir)
    manifest = store.read_manifest(_STEP)
    result.gate(str(live), manifest.digest, "committed local snapshot vs live state at its step")
    tensors = os.path.join(store.path(_STEP), TENSORS_FILE)
    if TENSORS_FILE not in manifest.files:
        raise RuntimeError(f"the snapshot has no {TENSORS_FILE}: {sorted(manifest.files)}")
    snap = _Snapshot(checkpoint_dir=checkpoint_dir, tensors_path=tensors,
                     tensors_bytes=os.path.getsize(tensors), total_bytes=manifest.total_bytes,
                     digest=str(live))
    del model, optimizer, state, ckpt
    gc.collect()
    return snap


# -- the tools ----------------------------------------------------------------------------------


class _Tools:
    """Each tool uploads the snapshot into a fresh prefix and returns its throughput (MB/s)."""

    def __init__(self, srv: Any, snap: _Snapshot, result: core.LegResult) -> None:
        from boto3.s3.transfer import TransferConfig

        from orchestrator.settings import load_settings
        from storage import LocalSnapshotStore

        self.srv = srv
        self.snap = snap
        self.result = result
        self.local = LocalSnapshotStore(snap.checkpoint_dir)
        self.settings = load_settings()  # what `orchestrator launch` uses (orchestrator/cli.py)
        self.part = _peer_part_size(snap.tensors_bytes)
        self.client_default = srv.client()
        self.client_tuned = srv.client(max_pool_connections=2 * _PEER_CONCURRENCY)
        self.cfg_default = TransferConfig()
        self.cfg_tuned = TransferConfig(multipart_threshold=self.part, multipart_chunksize=self.part,
                                        max_concurrency=_PEER_CONCURRENCY, use_threads=True)
        self.s5cmd = _find_s5cmd()
        self.data: bytes | None = None  # the raw ceiling's in-memory copy, read once
        self.event_mbps: list[float] = []
        #: tool -> (client CPU s per GB, endpoint CPU s per GB) of each timed upload
        self.cpu: dict[str, list[tuple[float, float]]] = {t: [] for t in (*_TOOLS, "warmup")}
        self._n = 0

    def _prefix(self, tool: str) -> str:
        self._n += 1
        return f"bench/{tool}-{self._n}"

    def measure(self, tool: str) -> float:
        """One timed upload by ``tool`` into a fresh prefix; MB/s."""
        fn: Callable[[str], float] = getattr(self, _METHOD[tool])
        return fn(tool)

    def ours(self, tool: str) -> float:
        from orchestrator.mirror import Mirror, open_remote

        prefix = self._prefix(tool)
        url = f"s3://{self.srv.bucket}/{prefix}"
        remote = open_remote(url)  # RemoteSnapshotStore(url), StorageSettings from the environment
        events = _Events()
        mirror = Mirror(remote=remote, local=self.local, events=events, settings=self.settings)
        mirror.start()
        try:
            if not mirror.flush(60.0):  # start-up rescan (list + stale-upload sweep), untimed
                raise RuntimeError(f"mirror rescan did not finish: {mirror.error}")
            span = _Span(self.srv.pid)
            mirror.notify([_STEP])
            done = mirror.flush(_TIMEOUT_S)
            seconds = span.stop(self.cpu[tool], self.snap.total_bytes)
        finally:
            mirror.close()
        if not done or mirror.error is not None:
            raise RuntimeError(f"our mirror did not upload the snapshot: {mirror.error}")
        uploaded = events.named("mirror.uploaded")
        if len(uploaded) != 1:
            raise RuntimeError(f"expected one mirror.uploaded event, got {events.events}")
        if uploaded[0].get("mb_per_s"):
            self.event_mbps.append(float(uploaded[0]["mb_per_s"]))
        info = remote.validate(_STEP, verify_checksums=True)  # every object re-read and hashed
        listed = [i.step for i in remote.list() if i.valid is not False]
        if not info.valid or info.manifest is None or listed != [_STEP]:
            self.result.notes.append(f"CORRECTNESS: {prefix}: remote snapshot invalid "
                                     f"({info.reason}; listed {listed})")
            self.result.correct = False
        else:
            self.result.gate(self.snap.digest, info.manifest.digest,
                             f"{prefix}: remote manifest digest vs live state")
        remote.delete(_STEP)
        return _mbps(self.snap.total_bytes, seconds)

    def _boto3(self, tool: str, client: Any, cfg: Any) -> float:
        key = f"{self._prefix(tool)}/tensors.bin"
        span = _Span(self.srv.pid)
        client.upload_file(self.snap.tensors_path, self.srv.bucket, key, Config=cfg)
        seconds = span.stop(self.cpu[tool], self.snap.tensors_bytes)
        self._check_and_delete(key)
        return _mbps(self.snap.tensors_bytes, seconds)

    def boto3_default(self, tool: str) -> float:
        return self._boto3(tool, self.client_default, self.cfg_default)

    def boto3_tuned(self, tool: str) -> float:
        return self._boto3(tool, self.client_tuned, self.cfg_tuned)

    def s5cmd_args(self, key: str) -> list[str]:
        assert self.s5cmd is not None
        return [self.s5cmd, "--endpoint-url", self.srv.endpoint_url, "--log", "error", "cp",
                "--concurrency", str(_PEER_CONCURRENCY), "--part-size", str(self.part // MiB),
                self.snap.tensors_path, f"s3://{self.srv.bucket}/{key}"]

    def s5cmd_run(self, tool: str) -> float:
        key = f"{self._prefix(tool)}/tensors.bin"
        env = {**os.environ, **self.srv.env(), "AWS_REGION": self.srv.region}
        span = _Span(self.srv.pid)
        proc = subprocess.run(self.s5cmd_args(key), env=env, capture_output=True, text=True,
                              timeout=_TIMEOUT_S, check=False)
        seconds = span.stop(self.cpu[tool], self.snap.tensors_bytes)
        if proc.returncode != 0:
            raise RuntimeError(f"s5cmd cp failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        self._check_and_delete(key)
        return _mbps(self.snap.tensors_bytes, seconds)

    def raw_put(self, tool: str, limit: int | None = None) -> float:
        """The endpoint's ceiling: N threads PUT parts of in-memory bytes (pre-signed, unsigned).

        ``limit`` uploads only that many bytes (the untimed warm-up)."""
        import urllib3

        if self.data is None:
            self.data = Path(self.snap.tensors_path).read_bytes()
        data = memoryview(self.data)[:limit]
        key = f"{self._prefix(tool)}/tensors.bin"
        c, bucket, part = self.client_default, self.srv.bucket, self.part
        nparts = -(-len(data) // part)
        http = urllib3.PoolManager(maxsize=_PEER_CONCURRENCY, retries=False,
                                   timeout=urllib3.Timeout(connect=120, read=120))  # connect: also the body's send

        def put(number: int) -> dict[str, Any]:
            url = c.generate_presigned_url("upload_part", ExpiresIn=3600, Params={
                "Bucket": bucket, "Key": key, "UploadId": upload_id, "PartNumber": number})
            body = data[(number - 1) * part : number * part]
            # A memoryview is bytes-like: http.client sends it as is, without a copy.
            resp = http.request("PUT", url, body=cast(Any, body),
                                headers={"Content-Length": str(len(body))})
            if resp.status != 200:
                raise RuntimeError(f"raw PUT of part {number}: HTTP {resp.status}: {resp.data[:200]!r}")
            return {"PartNumber": number, "ETag": resp.headers["ETag"]}

        span = _Span(self.srv.pid)
        upload_id = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        with ThreadPoolExecutor(max_workers=_PEER_CONCURRENCY) as pool:
            parts = list(pool.map(put, range(1, nparts + 1)))
        c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                    MultipartUpload={"Parts": parts})
        seconds = span.stop(self.cpu[tool], len(data))
        http.clear()
        self._check_and_delete(key, len(data))
        return _mbps(len(data), seconds)

    def _check_and_delete(self, key: str, expected: int | None = None) -> None:
        expected = self.snap.tensors_bytes if expected is None else expected
        size = int(self.client_default.head_object(Bucket=self.srv.bucket, Key=key)["ContentLength"])
        if size != expected:
            self.result.notes.append(f"{key}: {size} bytes uploaded, expected {expected}")
        self.client_default.delete_object(Bucket=self.srv.bucket, Key=key)


# Tool name -> the _Tools method that measures it (``s5cmd`` is the binary's path there).
_METHOD = {"ours": "ours", "boto3_default": "boto3_default", "boto3_tuned": "boto3_tuned",
           "s5cmd": "s5cmd_run", "raw_put": "raw_put"}


def _find_s5cmd() -> str | None:
    candidate = Path(sys.executable).parent / "s5cmd"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("s5cmd")


def _version(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"


# -- training step time while mirroring ---------------------------------------------------------


def _step_times(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seconds: float) -> list[float]:
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        started = time.perf_counter()
        core.train_step(model, optimizer)
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def _training_model(device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """A small MLP + AdamW sized so that one step takes about ``_STEP_TARGET_S``."""
    per_layer = 12 * (1024 * 1024 + 1024)
    layers = 2
    for _ in range(3):
        model = core.make_model(layers * per_layer, device=device, seed=1)
        optimizer = core.make_optimizer(model)
        step_s = statistics.median(_step_times(model, optimizer, 0.3))
        want = max(1, min(64, round(layers * _STEP_TARGET_S / max(step_s, 1e-4))))
        if abs(want - layers) <= max(1, layers // 10):
            return model, optimizer, layers
        layers = want
    model = core.make_model(layers * per_layer, device=device, seed=1)
    return model, core.make_optimizer(model), layers


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its waited-for children and its live descendants (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, IndexError, ValueError):
        return 0.0
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK") + sum(_tree_cpu_s(c) for c in children)


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all cores so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class _Loader:
    """Uploads the snapshot in a loop, in its own process group, paused and resumed at will.

    ``ours``: the mirror's upload in its own process (the product mirrors from the supervisor,
    never from a worker), product modules only. ``s5cmd``: one ``s5cmd cp`` after another from a
    shell loop, the control for what any upload to this endpoint costs training here. Paused
    with SIGSTOP (connections simply stall, far below the 30 s read timeouts) so that busy and idle
    slices can alternate every second without restarting anything.
    """

    def __init__(self, kind: str, srv: Any, snap: _Snapshot, tools: _Tools) -> None:
        self.kind = kind
        self._err = ""
        env = {**os.environ, **srv.env(), "AWS_REGION": srv.region}
        if kind == "ours":
            args = [sys.executable, "-c", _LOAD_LOOP, f"s3://{srv.bucket}/bench/load-ours",
                    snap.checkpoint_dir, str(_STEP)]
        elif kind == "boto3":
            args = [sys.executable, "-c", _BOTO3_LOOP, snap.tensors_path, srv.bucket,
                    "bench/load-boto3/tensors.bin"]
        else:
            loop = 'echo ready; while :; do "$@" >/dev/null || exit 1; echo uploaded; done'
            args = ["bash", "-c", loop, "bash", *tools.s5cmd_args("bench/load-s5cmd/tensors.bin")]
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=_REPO, start_new_session=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError(f"background {kind} uploader did not start: {self._err.strip()[-800:]}")

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # the group this loader created, by its id

    def pause(self) -> None:
        self._check()
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._check()
        self._signal(signal.SIGCONT)

    def cpu_s(self) -> float:
        return _tree_cpu_s(self.proc.pid)

    def _check(self) -> None:
        if self.proc.poll() is not None:
            _out, err = self.proc.communicate(timeout=30)
            raise RuntimeError(f"background {self.kind} uploader exited ({self.proc.returncode}): "
                               f"{err.strip()[-800:]}")

    def stop(self) -> int:
        """Terminate the group; how many uploads completed."""
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        try:
            out, self._err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            out, self._err = self.proc.communicate(timeout=30)
        return sum(1 for line in out.splitlines() if line.strip() == "uploaded")


_SLICE_S = 1.0  # one busy or idle slice of training steps
_SETTLE_S = 0.2  # after each pause/resume, before timing (in-flight bytes drain, uploads restart)


def _slowdown(config: core.BenchConfig, srv: Any, snap: _Snapshot, tools: _Tools,
              result: core.LegResult) -> None:
    """Median training step time while an uploader runs vs while it is paused, in alternation.

    Slices of ~1 s alternate (busy, idle, idle, busy, ...) so that drift in whatever else runs on
    the machine hits both alike; ours first, then s5cmd and boto3 (``upload_file``, default
    config) as the controls.
    """
    kinds = ["ours", "s5cmd", "boto3"] if tools.s5cmd is not None else ["ours", "boto3"]
    slices = 2 * config.repeats
    idle: dict[str, list[float]] = {k: [] for k in kinds}
    busy: dict[str, list[float]] = {k: [] for k in kinds}
    phases: dict[str, dict[str, Any]] = {}
    steps = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like OMP_NUM_THREADS=1 workers
    try:
        model, optimizer, layers = _training_model(config.device)
        for kind in kinds:
            loader = _Loader(kind, srv, snap, tools)
            wall = {"busy": 0.0, "idle": 0.0}
            uploader = {"busy": 0.0, "idle": 0.0}
            endpoint = {"busy": 0.0, "idle": 0.0}
            machine = {"busy": [0, 0], "idle": [0, 0]}
            try:
                for i in range(slices):
                    for state in (("busy", "idle") if i % 2 == 0 else ("idle", "busy")):
                        if state == "busy":
                            loader.resume()
                        else:
                            loader.pause()
                        time.sleep(_SETTLE_S)
                        c0, e0, m0, w0 = loader.cpu_s(), _process_cpu_s(srv.pid), _machine_busy(), time.perf_counter()
                        times = _step_times(model, optimizer, _SLICE_S)
                        m1 = _machine_busy()
                        wall[state] += time.perf_counter() - w0
                        uploader[state] += loader.cpu_s() - c0
                        endpoint[state] += _process_cpu_s(srv.pid) - e0
                        machine[state][0] += m1[0] - m0[0]
                        machine[state][1] += m1[1] - m0[1]
                        (busy if state == "busy" else idle)[kind].append(statistics.median(times))
                        steps += len(times)
                loader.resume()
            finally:
                uploads = loader.stop()
            cores = os.cpu_count() or 1
            phases[kind] = {
                "slowdown": round(core.ratio(statistics.median(busy[kind]), statistics.median(idle[kind])), 3),
                "uploads_completed": uploads,
                "uploader_cores_busy": round(uploader["busy"] / wall["busy"], 2),
                "endpoint_cores_busy": round(endpoint["busy"] / wall["busy"], 2),
                # All cores of the machine, training included (it takes one of them).
                "machine_cores_busy": {s: round(cores * m[0] / max(m[1], 1), 2) for s, m in machine.items()},
            }
        # Last, ORCH_MIRROR_MAX_MBPS=auto: uploads and idle gaps with heartbeats throughout.
        phases["ours_auto"], auto_busy, auto_idle, auto_notes = _AutoRun(srv, snap).run(model, optimizer)
    finally:
        torch.set_num_threads(threads)
    result.values["step_s_idle"] = core.Stat(unit="s", samples=tuple(idle["ours"]))
    result.values["step_s_mirroring"] = core.Stat(unit="s", samples=tuple(busy["ours"]))
    if "s5cmd" in kinds:
        result.values["step_s_s5cmd_uploading"] = core.Stat(unit="s", samples=tuple(busy["s5cmd"]))
        result.scalars["slowdown_control_s5cmd"] = phases["s5cmd"]["slowdown"]
    result.values["step_s_boto3_uploading"] = core.Stat(unit="s", samples=tuple(busy["boto3"]))
    result.scalars["slowdown_control_boto3"] = phases["boto3"]["slowdown"]
    result.scalars["slowdown_model"] = (f"MLP {layers}x Linear(1024,1024)+GELU, AdamW, batch 8, "
                                        f"torch.set_num_threads(1), {config.device}")
    result.scalars["slowdown_slices"] = f"{slices} busy + {slices} idle slices of {_SLICE_S} s per uploader"
    result.scalars["slowdown_steps_timed"] = steps
    result.scalars["slowdown_phases"] = phases
    auto = phases["ours_auto"]
    if auto_busy:
        result.values["step_s_ours_auto_uploading"] = core.Stat(unit="s", samples=tuple(auto_busy))
    if auto_idle:
        result.values["step_s_ours_auto_idle"] = core.Stat(unit="s", samples=tuple(auto_idle))
    result.scalars["slowdown_ours_auto"] = auto["slowdown"]
    result.scalars["ours_auto_cap_MBps"] = auto["cap_MBps"]
    result.scalars["ours_auto_upload_MBps"] = auto["upload_MBps"]
    result.scalars["slowdown_auto_schedule"] = (
        f"ORCH_MIRROR_MAX_MBPS=auto, ORCH_MIRROR_AUTO_WINDOW_S={auto['window_s']:g}, floor "
        f"{auto['cap_floor_MBps']:g} MB/s, heartbeats every {auto['heartbeat_s']:g} s, polled every "
        f"{auto['poll_s']:g} s: {_AUTO_WARMUP_W} idle windows, {_AUTO_CONVERGE_W} windows of uploading "
        f"unmeasured, then {_AUTO_CYCLES} cycles of >= {_AUTO_BUSY_W} windows uploading (to the end of "
        f"the snapshot in flight) and {_AUTO_IDLE_W} idle, slices of {_SLICE_S} s; budget {_AUTO_BUDGET_S:g} s")
    result.notes.extend(auto_notes)
    idle_load = phases["ours"]["machine_cores_busy"]["idle"]
    if idle_load > 1.3:
        result.notes.append(f"other work ran on this machine during the slowdown measurement: "
                            f"{idle_load} cores busy while only training (1 core) should have been; "
                            "the slowdown ratios are inflated by it")


# -- ORCH_MIRROR_MAX_MBPS=auto: the cap steered by the training's heartbeats ---------------------

_AUTO_WINDOW_S = 2.0  # ORCH_MIRROR_AUTO_WINDOW_S of the auto kind, unless the environment sets it
_AUTO_BEAT_FRACTION = 0.2  # heartbeat interval / window: the product's defaults (1 s / 5 s)
_AUTO_WARMUP_W = 3  # windows of training before the first upload: the idle baseline
_AUTO_CONVERGE_W = 6  # windows of uploading before anything is measured: the cap converges
_AUTO_BUSY_W = 3  # measured uploading per cycle before "idle" is asked (the upload in flight ends it)
_AUTO_IDLE_W = 2  # idle per cycle: at least one whole idle window refreshes the baseline
_AUTO_CYCLES = 2  # measured (uploading, idle) cycles after the convergence
_AUTO_BUDGET_S = 90.0  # the kind stops here, even in the middle of an upload (large sizes)


class _Beats:
    """The bench training loop's heartbeats, written as a rank writes them (``Checkpointer``):
    ``run/progress/rank-0.json`` after a completed step, at most once per ``interval_s``."""

    def __init__(self, checkpoint_dir: str, interval_s: float) -> None:
        from contract.paths import RunPaths

        self._path = RunPaths.of(checkpoint_dir).heartbeat(0)
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        self._interval_s = interval_s
        self._next = 0.0
        self.step = 0

    def step_done(self) -> None:
        from contract.documents import Heartbeat, write_document

        self.step += 1
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._interval_s
            write_document(self._path, Heartbeat(rank=0, step=self.step, attempt=0, time=time.time(),
                                                 pid=os.getpid()), durable=False)


def _beating_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seconds: float,
                   beats: _Beats) -> list[float]:
    """:func:`_step_times` with a heartbeat after each step (untimed, like the rank's own)."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or not times:
        started = time.perf_counter()
        core.train_step(model, optimizer)
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        beats.step_done()
    return times


class _AutoUploader:
    """The ``ours_auto`` uploader process (:data:`_AUTO_LOOP`), driven through its stdin."""

    def __init__(self, srv: Any, snap: _Snapshot, checkpoint_dir: str, env: dict[str, str]) -> None:
        full_env = {**os.environ, **srv.env(), "AWS_REGION": srv.region, **env}
        args = [sys.executable, "-c", _AUTO_LOOP, f"s3://{srv.bucket}/bench/load-ours-auto",
                snap.checkpoint_dir, str(_STEP), checkpoint_dir]
        self.proc = subprocess.Popen(args, env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=_REPO, start_new_session=True)
        self._messages: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        try:
            self.ready = self._first_message(timeout_s=120.0)
        except BaseException:
            self.stop()
            raise

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {"event": "text", "text": line.rstrip()}
            self._messages.put(msg if isinstance(msg, dict) else {"event": "text", "text": line.rstrip()})
        self._messages.put({"event": "eof"})

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())

    def _first_message(self, timeout_s: float) -> dict[str, Any]:
        try:
            msg = self._messages.get(timeout=timeout_s)
        except queue.Empty:
            msg = {"event": "timeout"}
        if msg.get("event") != "ready" or not msg.get("auto"):
            raise RuntimeError(f"background ours_auto uploader did not start: {msg}: {self.stderr()}")
        return msg

    def stderr(self) -> str:
        return "\n".join(self._stderr)[-800:]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            try:
                out.append(self._messages.get_nowait())
            except queue.Empty:
                return out

    def cpu_s(self) -> float:
        return _tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        """End of stdin closes the mirror (an upload in flight is cut); then the group goes."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this uploader created, by its id
            self.proc.wait(timeout=30)


class _AutoRun:
    """The ``ours_auto`` kind of :func:`_slowdown`; see the module docstring for the design."""

    def __init__(self, srv: Any, snap: _Snapshot) -> None:
        from orchestrator.settings import load_settings

        self.srv = srv
        self.snap = snap
        self.env = {"ORCH_MIRROR_MAX_MBPS": "auto",
                    "ORCH_MIRROR_AUTO_WINDOW_S": os.environ.get("ORCH_MIRROR_AUTO_WINDOW_S", str(_AUTO_WINDOW_S))}
        self.settings = load_settings({**os.environ, **self.env})
        self.window_s = self.settings.mirror_auto_window_s
        self.dir = os.path.join(os.path.dirname(snap.checkpoint_dir), "auto")  # hard links: same disk
        # What the uploader said, and the state it implies.
        self.uploading = False
        self.requested = False  # "busy" sent, its reply not seen yet
        self.idle_asked = False
        self.changed = 0.0  # when `uploading` (or the convergence) last changed, our clock
        self.upload_started: float | None = None  # our clock
        self.t0 = 0.0  # the same moment on the uploader's clock (its reports' "t")
        self.converged_at: float | None = None
        self.cap: float | None = None  # MB/s; None: unlimited
        self.trajectory: list[list[Any]] = []
        self.uploads = 0
        self.retries = 0
        self.segment: tuple[int, float] | None = None  # (bytes granted, time) at its start
        self.last_counters: tuple[int, float] | None = None
        self.sent = 0
        self.sent_s = 0.0
        self.measured = {"busy": 0.0, "idle": 0.0}  # this phase's labelled seconds
        self.last_busy_s = 0.0  # the last uploading phase, "busy" to "drained"
        self.notes: list[str] = []

    def _take(self, loader: _AutoUploader) -> None:
        for msg in loader.messages():
            event = msg.get("event")
            now = time.monotonic()
            if "granted" in msg:
                self.last_counters = (int(msg["granted"]), float(msg["t"]))
            if event == "throttled":
                self.cap = msg.get("cap_mb_per_s")
                self.trajectory.append([round(float(msg["t"]) - self.t0, 1), msg.get("action"),
                                        None if self.cap is None else round(self.cap, 2)])
            elif event == "uploaded":
                self.uploads += 1
            elif event == "busy":
                self.uploading, self.requested, self.idle_asked, self.changed = True, False, False, now
                self.measured["busy"] = 0.0
                if self.upload_started is None:
                    self.upload_started, self.t0 = now, float(msg["t"])
                if self.converged_at is not None:
                    self.segment = (int(msg["granted"]), float(msg["t"]))
            elif event == "mark":
                self.segment = (int(msg["granted"]), float(msg["t"]))
            elif event == "drained":
                self.last_busy_s = now - self.changed
                self.uploading, self.changed = False, now
                self.measured["idle"] = 0.0
                self._end_segment(int(msg["granted"]), float(msg["t"]))
            elif event == "mirror.retry":
                self.retries += 1
            elif event == "mirror.failed":
                raise RuntimeError(f"ours_auto mirror failed: {msg}")
            elif event == "text" and len(self.notes) < 5:  # a log line (structlog prints warnings)
                self.notes.append(f"ours_auto uploader said: {str(msg.get('text'))[:300]}")
            elif event == "eof":
                raise RuntimeError(f"background ours_auto uploader exited: {loader.stderr()}")

    def _end_segment(self, granted: int, t: float) -> None:
        if self.segment is not None and t > self.segment[1]:
            self.sent += granted - self.segment[0]
            self.sent_s += t - self.segment[1]
        self.segment = None

    def _label(self, now: float) -> str | None:
        """What a slice starting now measures: "busy", "idle" or nothing (settling, converging)."""
        if self.requested or now - self.changed < _SETTLE_S:
            return None
        if self.uploading:
            return "busy" if self.converged_at is not None else None
        return "idle"

    def run(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
            ) -> tuple[dict[str, Any], list[float], list[float], list[str]]:
        """(the phase's fields, busy slice medians, idle slice medians, notes)."""
        w = self.window_s
        shutil.rmtree(self.dir, ignore_errors=True)
        beats = _Beats(self.dir, w * _AUTO_BEAT_FRACTION)
        loader = _AutoUploader(self.srv, self.snap, self.dir, self.env)
        samples: dict[str, list[float]] = {"busy": [], "idle": []}
        caps: list[float] = []
        wall = {"busy": 0.0, "idle": 0.0}
        uploader = {"busy": 0.0, "idle": 0.0}
        endpoint = {"busy": 0.0, "idle": 0.0}
        machine = {"busy": [0, 0], "idle": [0, 0]}
        measured = self.measured
        cycles, steps = 0, 0
        started = self.changed = time.monotonic()
        deadline = started + _AUTO_BUDGET_S
        try:
            while True:
                self._take(loader)
                now = time.monotonic()
                if now >= deadline:
                    self.notes.append(f"ours_auto: stopped at its {_AUTO_BUDGET_S:g} s budget "
                                      f"{'during an upload' if self.uploading else 'while idle'} "
                                      f"after {cycles} measured cycles")
                    break
                if not self.uploading and not self.requested:
                    warm = self.upload_started is None and now - started >= _AUTO_WARMUP_W * w
                    rested = self.upload_started is not None and measured["idle"] >= _AUTO_IDLE_W * w
                    if rested:
                        cycles += 1
                        if cycles >= _AUTO_CYCLES or now + self.last_busy_s + (_AUTO_IDLE_W + 1) * w > deadline:
                            break
                    if warm or rested:
                        loader.send("busy")
                        self.requested = True
                elif self.uploading:
                    assert self.upload_started is not None
                    if self.converged_at is None and now - self.upload_started >= _AUTO_CONVERGE_W * w:
                        self.converged_at = now  # the uploading goes on: measured from here
                        loader.send("mark")
                    elif self.converged_at is not None and not self.idle_asked and measured["busy"] >= _AUTO_BUSY_W * w:
                        loader.send("idle")
                        self.idle_asked = True
                label = self._label(now)
                version = self.changed
                c0, e0, m0, w0 = loader.cpu_s(), _process_cpu_s(self.srv.pid), _machine_busy(), time.perf_counter()
                converging = self.uploading and self.converged_at is None
                times = _beating_steps(model, optimizer, _SLICE_S if label or converging else _SETTLE_S, beats)
                m1 = _machine_busy()
                steps += len(times)
                self._take(loader)
                if label is None or self.changed != version:
                    continue  # settling, converging, or the state changed within the slice
                seconds = time.perf_counter() - w0
                wall[label] += seconds
                measured[label] += seconds
                uploader[label] += loader.cpu_s() - c0
                endpoint[label] += _process_cpu_s(self.srv.pid) - e0
                machine[label][0] += m1[0] - m0[0]
                machine[label][1] += m1[1] - m0[1]
                samples[label].append(statistics.median(times))
                if label == "busy":
                    caps.append(math.inf if self.cap is None else float(self.cap))
        finally:
            if self.segment is not None and self.last_counters is not None:
                self._end_segment(*self.last_counters)  # the budget cut an upload short
            loader.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
        return self._phase(samples, caps, wall, uploader, endpoint, machine, cycles, steps,
                           time.monotonic() - started), samples["busy"], samples["idle"], self.notes

    def _phase(self, samples: dict[str, list[float]], caps: list[float], wall: dict[str, float],
               uploader: dict[str, float], endpoint: dict[str, float], machine: dict[str, list[int]],
               cycles: int, steps: int, seconds: float) -> dict[str, Any]:
        busy, idle = samples["busy"], samples["idle"]
        cores = os.cpu_count() or 1
        cap = statistics.median(caps) if caps else None
        decisions = collections.Counter(str(a) for _, a, _ in self.trajectory)
        if not busy or not idle:
            self.notes.append(f"ours_auto: {len(busy)} uploading and {len(idle)} idle slices measured: "
                              "no slowdown")
        if self.retries:
            self.notes.append(f"ours_auto: the mirror retried {self.retries} transient errors")
        return {
            "slowdown": round(core.ratio(statistics.median(busy), statistics.median(idle)), 3)
            if busy and idle else None,
            "uploads_completed": self.uploads,
            "uploader_cores_busy": round(uploader["busy"] / wall["busy"], 2) if wall["busy"] else None,
            "endpoint_cores_busy": round(endpoint["busy"] / wall["busy"], 2) if wall["busy"] else None,
            "machine_cores_busy": {s: round(cores * m[0] / max(m[1], 1), 2) for s, m in machine.items()},
            # The cap in force over the measured uploading slices (median; None: unlimited), the
            # last one, its floor, and what the mirror sent per second while it uploaded after
            # the convergence (bytes through its token bucket / seconds from first byte to drained).
            "cap_MBps": None if cap is None or math.isinf(cap) else round(cap, 2),
            "cap_final_MBps": None if self.cap is None else round(self.cap, 2),
            "cap_floor_MBps": self.settings.mirror_auto_min_mbps,
            "upload_MBps": round(self.sent / core.MB / self.sent_s, 2) if self.sent_s > 0 else None,
            "decisions": {a: decisions.get(a, 0) for a in ("backoff", "raise", "lift")},
            "cap_trajectory": self.trajectory,  # [s since the first upload, action, cap MB/s]
            "busy_slices": len(busy),
            "idle_slices": len(idle),
            "cycles": cycles,
            "steps_timed": steps,
            "seconds": round(seconds, 1),
            "window_s": self.window_s,
            "heartbeat_s": round(self.window_s * _AUTO_BEAT_FRACTION, 3),
            "poll_s": self.settings.poll_interval_s,
        }


# -- the leg ------------------------------------------------------------------------------------


def run(config: core.BenchConfig, size_bytes: int) -> core.LegResult:
    from storage.settings import StorageSettings
    from tests.support.s3server import S3Server

    result = core.LegResult(leg="mirror", size=core.size_label(size_bytes), size_bytes=size_bytes)
    snap = _make_snapshot(config, size_bytes, result)
    result.size_bytes = snap.total_bytes
    srv = S3Server(bucket="bench-mirror")
    try:
        srv.start()
        with _environ(srv.env()):
            tools = _Tools(srv, snap, result)
            if tools.s5cmd is None:
                result.notes.append("s5cmd not found (venv bin dir or PATH): its comparison is unmet")
            names = [t for t in _TOOLS if t != "s5cmd" or tools.s5cmd is not None]
            # Warm-up, untimed: the server allocates its first volumes, clients open connections.
            tools.raw_put("warmup", limit=4 * tools.part)
            samples: dict[str, list[float]] = {t: [] for t in names}
            for i in range(config.repeats):
                order = names if i % 2 == 0 else names[::-1]  # drift hits every tool alike
                for tool in order:
                    samples[tool].append(tools.measure(tool))
            for tool in names:
                result.values[f"{tool}_MBps"] = core.Stat(unit="MB/s", samples=tuple(samples[tool]))
            tools.data = None
            for parts in config.part_concurrency:  # --part-concurrency: ours with N parts in flight
                sweep = f"ours_c{parts}"
                tools.cpu[sweep] = []  # kept apart from the main comparison's CPU figures
                with _environ({"ORCH_REMOTE_CONCURRENCY": str(parts)}):
                    result.values[f"{sweep}_MBps"] = core.Stat(unit="MB/s", samples=tuple(
                        tools.ours(sweep) for _ in range(config.repeats)))
            _slowdown(config, srv, snap, tools, result)
            storage = StorageSettings.from_env()
            result.scalars.update({
                "bytes_ours": snap.total_bytes,
                "bytes_peers": snap.tensors_bytes,
                "ours_settings": (f"orchestrator Mirror + RemoteSnapshotStore, defaults: part "
                                  f"{storage.remote_part_size // MiB} MiB, concurrency "
                                  f"{storage.remote_concurrency}, multipart threshold "
                                  f"{storage.remote_multipart_threshold // MiB} MiB, one SHA-256 "
                                  "pass per file + CRC32 per part; ORCH_MIRROR_NICE="
                                  f"{int(tools.settings.mirror_nice)}, ORCH_MIRROR_MAX_MBPS="
                                  f"{tools.settings.mirror_max_mbps or 'unset'}"),
                "boto3_default_settings": (f"TransferConfig() ({tools.cfg_default.multipart_chunksize // MiB} "
                                           f"MiB parts, max_concurrency {tools.cfg_default.max_concurrency}); "
                                           "both boto3 runs send botocore's default CRC32 checksums"),
                "boto3_tuned_settings": (f"TransferConfig(multipart_chunksize={tools.part // MiB} MiB, "
                                         f"max_concurrency={_PEER_CONCURRENCY}, use_threads=True), "
                                         f"max_pool_connections={2 * _PEER_CONCURRENCY}"),
                "s5cmd_settings": " ".join(["s5cmd", *tools.s5cmd_args("KEY")[1:]]).replace(
                    snap.tensors_path, "tensors.bin") if tools.s5cmd else "not installed",
                "raw_put_settings": (f"multipart, {tools.part // MiB} MiB parts from memory, "
                                     f"{_PEER_CONCURRENCY} threads, pre-signed URLs via urllib3 "
                                     "(UNSIGNED-PAYLOAD, no checksum)"),
            })
            result.scalars["cpu_s_per_GB_client"] = {
                t: round(statistics.median(c for c, _ in tools.cpu[t]), 2) for t in names}
            result.scalars["cpu_s_per_GB_endpoint"] = {
                t: round(statistics.median(e for _, e in tools.cpu[t]), 2) for t in names}
            if tools.event_mbps:
                result.scalars["ours_mirror_event_MBps_median"] = round(statistics.median(tools.event_mbps), 1)
    finally:
        srv.stop()
        shutil.rmtree(snap.checkpoint_dir, ignore_errors=True)
    _versions(result)
    _targets(result)
    return result


def _versions(result: core.LegResult) -> None:
    import boto3
    import botocore
    import s3transfer

    from tests.support.s3server import find_weed

    s5 = _find_s5cmd()
    result.scalars["versions"] = {
        "boto3": boto3.__version__,
        "botocore": botocore.__version__,
        "s3transfer": s3transfer.__version__,
        "s5cmd": _version([s5, "version"]) if s5 else None,
        "seaweedfs": _version([find_weed(), "version"]),
    }
    result.notes.append("endpoint: SeaweedFS `weed mini` on loopback sharing this machine's cores "
                        "with the clients; the source file is in the page cache for every tool")


def _targets(result: core.LegResult) -> None:
    v = result.values
    ours = v["ours_MBps"].median

    def paired(peer: str) -> float | None:
        if peer not in v:
            return None
        return round(statistics.median(a / b for a, b in zip(v["ours_MBps"].samples, v[peer].samples, strict=True)), 3)

    s5 = v["s5cmd_MBps"].median if "s5cmd_MBps" in v else 0.0
    result.targets += [
        core.Target(name="ours_vs_s5cmd", value=core.ratio(ours, s5), bound=1.0, op=">=",
                    meaning="mirror upload MB/s / s5cmd cp (tuned) MB/s"),
        core.Target(name="ours_vs_boto3_default", value=core.ratio(ours, v["boto3_default_MBps"].median),
                    bound=1.2, op=">=", meaning="mirror upload MB/s / boto3 upload_file (default config) MB/s"),
        core.Target(name="ours_vs_raw_put", value=core.ratio(ours, v["raw_put_MBps"].median),
                    bound=0.0, op=">=",
                    meaning="mirror upload MB/s / endpoint's raw PUT ceiling (fraction of the limit; no bound)"),
        core.Target(name="step_slowdown", value=core.ratio(v["step_s_mirroring"].median, v["step_s_idle"].median),
                    bound=1.05, op="<=",
                    meaning="median training step while our mirror uploads / idle (mirror in another process)"),
    ]
    result.scalars["ours_vs_boto3_tuned"] = round(core.ratio(ours, v["boto3_tuned_MBps"].median), 3)
    result.scalars["paired_ratio_medians"] = {
        peer: paired(f"{peer}_MBps") for peer in ("s5cmd", "boto3_default", "boto3_tuned", "raw_put")
    }
