"""Admission control: a bounded queue in front of the denoising loop, shared by the model processes
of one tritonserver through files in its run directory.

Triton's own queue policy cannot do it here (measured on 2.51): an ensemble cannot have one; on the
`scheduler` it refuses only after the tokenizer and the text encoder have run, with "Exceeds maximum
queue size" that names neither the server's state nor the bound; and a client's timeout does not
reach the steps of an ensemble. So the first step, the `tokenizer`, admits or refuses each request
as it arrives: it admits while fewer than (loops + max_queue_size) admitted requests are in the
system, so max_queue_size is how many may wait once every loop is busy. The `scheduler` takes the
request off the queue when a loop frees:

    <run>/loops/<pid>        a scheduler instance, one denoising loop   (scheduler creates it on load)
    <run>/queued/<ticket>    admitted, not yet in a loop                (tokenizer creates it)
    <run>/running/<ticket>   in a scheduler's loop                      (scheduler renames, then removes it)
    <run>/draining           present: admit nothing (the supervisor's drain or restart)
    <run>/unhealthy/<name>   a model saw "Stub process '<name>' is not healthy" (the supervisor restarts)
    <run>/cancelled/<ticket> its caller cancelled: the denoiser drops it before its next step
                             (BLS requests cannot be cancelled on 2.51; sdxl_stream marks them here)

The run directory belongs to one tritonserver process (`sdxl-triton-<pid>` on tmpfs), so a restart
starts empty and the supervisor finds it from the pid. A request cancelled between the tokenizer and
the scheduler never takes its ticket; tickets older than `ticket_ttl_s` are not counted.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .endpoint import InvalidInput

RUN_DIR_ENV = "SDXL_RUN_DIR"  # where run directories are made (default: /dev/shm, else the temp dir)
RUN_DIR_PREFIX = "sdxl-triton-"
TICKET_TENSOR = "admission_ticket"  # tokenizer output -> scheduler input (BYTES [1]), wired by the ensemble
TICKET_FORMAT = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: a file name, never a path
QUEUE_TIMEOUT_PARAMETER = "queue_timeout_ms"  # the request parameter a client may set
MAX_QUEUE_TIMEOUT_MS = 3_600_000
# Triton's message for a call to a dead Python stub, which it never restarts (2.51)
NOT_HEALTHY = re.compile(r"Stub process '([\w.-]+)' is not healthy")


class Refused(Exception):
    """The request is not run: HTTP 503 / gRPC UNAVAILABLE with this message (try again later).
    reason: capacity, draining or queue_timeout (the refusals metric's label)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def runs_root() -> Path:
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def run_directory(server_pid: int) -> Path:
    """The run directory of the tritonserver with this pid (a model's: os.getppid())."""
    return runs_root() / f"{RUN_DIR_PREFIX}{server_pid}"


@dataclass(frozen=True)
class AdmissionPolicy:
    """The tokenizer's config parameters (model_repository/tokenizer/config.pbtxt)."""

    max_queue_size: int = 4  # as model_repository/tokenizer/config.pbtxt, chosen in benchmarks/results/faults_cpu.md
    default_queue_timeout_ms: int = 0  # 0: a request waits for a slot as long as it takes
    ticket_ttl_s: float = 600.0

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "AdmissionPolicy":
        values = {}
        for key, kind in (("max_queue_size", int), ("default_queue_timeout_ms", int), ("ticket_ttl_s", float)):
            if key in parameters:
                try:
                    values[key] = kind(parameters[key])
                except ValueError:
                    raise ValueError(f"model config parameter {key}={parameters[key]!r}: expected a {kind.__name__}") from None
                if values[key] < 0:
                    raise ValueError(f"model config parameter {key}={parameters[key]!r}: expected 0 or more")
        return cls(**values)


def queue_timeout_s(request_parameters: Mapping[str, object], policy: AdmissionPolicy) -> float | None:
    """The request's `queue_timeout_ms` parameter (Triton request parameters: tritonclient's
    `parameters=`, perf_analyzer's --request-parameter), else the policy's default; None: no limit."""
    value = request_parameters.get(QUEUE_TIMEOUT_PARAMETER, policy.default_queue_timeout_ms)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUEUE_TIMEOUT_MS:
        raise InvalidInput(QUEUE_TIMEOUT_PARAMETER, value,
                           f"an integer request parameter from 0 (no limit) to {MAX_QUEUE_TIMEOUT_MS} (milliseconds)")
    return value / 1000 if value else None


class RunState:
    """One tritonserver's run directory: the queue, the drain flag and the health reports."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.queued = self.directory / "queued"
        self.running = self.directory / "running"
        self.loops_dir = self.directory / "loops"
        self.unhealthy = self.directory / "unhealthy"
        self.draining_flag = self.directory / "draining"
        self.cancelled = self.directory / "cancelled"

    def create(self) -> "RunState":
        for path in (self.queued, self.running, self.unhealthy, self.loops_dir, self.cancelled):
            path.mkdir(parents=True, exist_ok=True)
        return self

    # The tokenizer's side
    def admit(self, policy: AdmissionPolicy, timeout_s: float | None) -> str:
        """A ticket for a request that may wait for a denoising slot, or Refused."""
        if self.draining_flag.exists():
            raise Refused("draining", f"server is {self._draining_reason()}: not accepting requests; retry on another replica")
        with self._lock():
            loops = self.loops()
            admitted = self._live_queued(policy.ticket_ttl_s) + self._live_running()
            if admitted >= loops + policy.max_queue_size:
                raise Refused("capacity", f"server at capacity: {admitted} requests admitted ({loops} denoising loops "
                              f"+ max_queue_size {policy.max_queue_size}); retry later")
            ticket = uuid.uuid4().hex
            # A request admitted while a loop is free does not wait for one: its timeout never applies
            # (the time it spends in the text encoder is not queueing).
            waits = admitted >= loops
            self._write(self.queued / ticket, {"admitted": time.time(), "timeout_s": timeout_s if waits else None})
        return ticket

    # The scheduler's side
    def start(self, ticket: str) -> float:
        """Take the ticket off the queue into the loop; the seconds since its admission. Refused when
        it was admitted with every loop busy and waited longer than its queue timeout (a slot frees
        only when a loop ends, so that is when it is told)."""
        source, target = self.queued / ticket, self.running / ticket
        try:
            record = json.loads(source.read_text())
            os.replace(source, target)
        except (OSError, ValueError):  # expired, or the server restarted: run it anyway
            record = {"admitted": time.time(), "timeout_s": None}
        waited = max(0.0, time.time() - record["admitted"])
        self._write(target, {**record, "started": time.time(), "pid": os.getpid()})
        if record["timeout_s"] is not None and waited > record["timeout_s"]:
            self.finish(ticket)
            raise Refused("queue_timeout", f"waited {waited * 1000:.0f} ms for a denoising slot, over its "
                          f"{QUEUE_TIMEOUT_PARAMETER}={record['timeout_s'] * 1000:.0f}; retry later")
        return waited

    @staticmethod
    def is_ticket(text: str) -> bool:
        return bool(TICKET_FORMAT.fullmatch(text))

    def finish(self, ticket: str) -> None:
        """The request is done (or failed, or never started): its queue place or loop slot is free."""
        (self.queued / ticket).unlink(missing_ok=True)
        (self.running / ticket).unlink(missing_ok=True)
        (self.cancelled / ticket).unlink(missing_ok=True)

    def cancel(self, ticket: str) -> None:
        """The ticket's caller cancelled: whoever runs its work stops (is_cancelled)."""
        (self.cancelled / ticket).touch()

    def is_cancelled(self, ticket: str) -> bool:
        return (self.cancelled / ticket).exists()

    def register_loop(self) -> None:
        """A scheduler instance (one loop) is up; counted while its process lives."""
        (self.loops_dir / str(os.getpid())).touch()

    def loops(self) -> int:
        return sum(1 for path in _entries(self.loops_dir) if path.name.isdigit() and _alive(int(path.name)))

    def report_unhealthy(self, message: str) -> None:
        """Tell the supervisor that a model's process answers "not healthy" (it cannot see it otherwise)."""
        match = NOT_HEALTHY.search(message)
        if match and self.unhealthy.is_dir():
            (self.unhealthy / match.group(1)).touch()

    # The supervisor's side
    def set_draining(self, reason: str) -> None:
        self.draining_flag.write_text(reason)

    def counts(self, ttl_s: float = AdmissionPolicy.ticket_ttl_s) -> tuple[int, int]:
        """(queued, running): running counts only loops whose process is alive."""
        return self._live_queued(ttl_s), self._live_running()

    def unhealthy_reports(self) -> list[str]:
        return sorted(p.name for p in _entries(self.unhealthy))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _draining_reason(self) -> str:
        try:
            return self.draining_flag.read_text().strip() or "draining"
        except OSError:
            return "draining"

    def _live_running(self) -> int:
        running = 0
        for path in _entries(self.running):
            try:
                running += _alive(json.loads(path.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                pass  # gone meanwhile
        return running

    def _live_queued(self, ttl_s: float) -> int:
        oldest = time.time() - ttl_s
        count = 0
        for path in _entries(self.queued):
            try:
                if path.stat().st_mtime >= oldest:
                    count += 1
                else:
                    path.unlink(missing_ok=True)
            except FileNotFoundError:
                pass  # taken by a scheduler meanwhile
        return count

    def _lock(self):
        return _FileLock(self.directory / "lock")

    @staticmethod
    def _write(path: Path, record: dict) -> None:
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(json.dumps(record))
        os.replace(partial, path)


def _entries(directory: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(directory) if not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    """Whether a process runs (a dead loop's tickets and registration do not count)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class _FileLock:
    """An exclusive flock: count-then-admit must be atomic across the tokenizer's instances."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.handle = open(self.path, "a")  # noqa: SIM115 - closed in __exit__
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
