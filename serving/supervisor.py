"""The process that `make serve` and the container run: tritonserver under supervision.

Triton 2.51 never restarts a dead Python-backend stub, keeps answering ready while requests routed
to it fail, and fails in-flight BLS calls once SIGTERM switches it to exiting (DESIGN.md). So:

- Before each start, the shared-memory regions and run directories of dead servers are removed.
- Every `poll_s` the stubs of tritonserver (its child processes) are checked: one that exited, is a
  zombie, is stopped for longer than `stopped_grace_s`, or that a model reported "not healthy"
  (serving/admission.py), or tritonserver itself exiting or not ready, makes the server not ready at
  once and restarts it: new requests are refused (UNAVAILABLE), the loops running on healthy
  instances get `restart_drain_s` to finish, then the process group is killed and started afresh.
- Its own HTTP endpoint (`--health-port`) answers what the Kubernetes probes ask:
  `/v2/health/ready` 200 only while tritonserver is ready, every stub runs and no drain or restart
  is under way; `/v2/health/live` 200 unless the supervisor gave up (more than `max_restarts`
  restarts in `restart_window_s`: then it exits 1 so that the pod restarts); `/metrics` the
  restarts, stub failures, the admission queue and the state, in Prometheus' text format.
- SIGTERM or SIGINT drains: readiness false first, no new request admitted (UNAVAILABLE "draining"),
  every admitted request finishes (at most `drain_timeout_s`), then tritonserver gets SIGINT (its
  own shutdown, at most `exit_timeout_s`), and the supervisor exits 0. A Kubernetes pod's
  terminationGracePeriodSeconds must cover `shutdown_budget_s` = drain + exit + a margin.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

from contract import security
from contract.layout import REPO_ROOT

from .admission import RunState, run_directory
from .processes import remove_regions, stub_problem, stubs_of
from .server import ServerError, TritonServer, dies_with, free_ports

KILL_MARGIN_S = 5  # after drain + exit: what the supervisor needs to kill leftovers and exit


@dataclass(frozen=True)
class Timing:
    poll_s: float = 0.5
    stopped_grace_s: float = 3.0  # a stub stopped this long (SIGSTOP, a debugger) counts as failed
    not_ready_grace_s: float = 3.0  # tritonserver's own readiness failing this long: restart
    start_timeout_s: float = 600.0  # production engines take minutes to load
    restart_drain_s: float = 5.0
    drain_timeout_s: float = 60.0
    exit_timeout_s: float = 15.0
    max_restarts: int = 5
    restart_window_s: float = 600.0

    @property
    def shutdown_budget_s(self) -> float:
        """What a SIGTERM may take, end to end: the pod's terminationGracePeriodSeconds at least."""
        return self.drain_timeout_s + self.exit_timeout_s + KILL_MARGIN_S


@dataclass
class Status:
    """What the health endpoint reports; written by the supervisor's loop, read by its HTTP threads."""

    state: str = "starting"  # starting, serving, restarting, draining, stopped, failed
    restarts: Counter = field(default_factory=Counter)  # reason -> count
    stub_failures: Counter = field(default_factory=Counter)  # (model, problem) -> count
    last_recovery_s: float = 0.0
    last_detection_s: float = 0.0
    queued: int = 0
    running: int = 0

    @property
    def ready(self) -> bool:
        return self.state == "serving"

    @property
    def live(self) -> bool:
        return self.state != "failed"

    def metrics(self) -> str:
        lines = [
            "# HELP sdxl_supervisor_restarts_total tritonserver restarts by the supervisor, by reason",
            "# TYPE sdxl_supervisor_restarts_total counter",
            *(f'sdxl_supervisor_restarts_total{{reason="{reason}"}} {count}' for reason, count in sorted(self.restarts.items())),
            "# HELP sdxl_supervisor_stub_failures_total Python-backend stub processes found failed, by model and problem",
            "# TYPE sdxl_supervisor_stub_failures_total counter",
            *(f'sdxl_supervisor_stub_failures_total{{model="{model}",problem="{problem}"}} {count}'
              for (model, problem), count in sorted(self.stub_failures.items())),
            "# HELP sdxl_supervisor_ready 1 while the server takes requests (the readiness probe's answer)",
            "# TYPE sdxl_supervisor_ready gauge",
            f"sdxl_supervisor_ready {int(self.ready)}",
            "# HELP sdxl_supervisor_draining 1 while a SIGTERM drain is under way",
            "# TYPE sdxl_supervisor_draining gauge",
            f"sdxl_supervisor_draining {int(self.state == 'draining')}",
            "# HELP sdxl_supervisor_last_detection_seconds From a stub failure to the server reported not ready, last time",
            "# TYPE sdxl_supervisor_last_detection_seconds gauge",
            f"sdxl_supervisor_last_detection_seconds {self.last_detection_s:.3f}",
            "# HELP sdxl_supervisor_last_recovery_seconds From a failure found to the server ready again, last time",
            "# TYPE sdxl_supervisor_last_recovery_seconds gauge",
            f"sdxl_supervisor_last_recovery_seconds {self.last_recovery_s:.3f}",
            "# HELP sdxl_admission_queued_requests Admitted requests waiting for a denoising slot",
            "# TYPE sdxl_admission_queued_requests gauge",
            f"sdxl_admission_queued_requests {self.queued}",
            "# HELP sdxl_admission_running_requests Requests in a denoising loop",
            "# TYPE sdxl_admission_running_requests gauge",
            f"sdxl_admission_running_requests {self.running}",
        ]
        return "\n".join(lines) + "\n"


class SignalFlag:
    """The part of threading.Event the supervisor needs (set, is_set, wait), safe to set from a signal
    handler. Event.set takes the Event's lock, and a handler runs on the main thread between two
    bytecodes: a second SIGTERM that arrived while the first handler was inside Event.set() waited
    for the lock its own thread held, forever (seen with `kill -TERM -- -PGID` of `make serve`, which
    signals make and the supervisor at once). Here set() is one assignment, and wait() sleeps in
    short steps that a signal cannot hold up."""

    STEP_S = 0.02

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._set and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self.STEP_S, left))
        return self._set


class Restart(Exception):
    def __init__(self, reason: str, detail: str, since: float):
        super().__init__(detail)
        self.reason, self.since = reason, since


class Supervisor:
    def __init__(self, server: TritonServer, timing: Timing = Timing(), health_port: int = 8003, log=sys.stderr):
        self.server, self.timing, self.health_port, self._log = server, timing, health_port, log
        self.status = Status()
        self._stop = SignalFlag()  # first SIGTERM/SIGINT: drain
        self._hurry = SignalFlag()  # a second one: stop waiting for requests
        self._hurry_logged = False
        self._restart_times: deque[float] = deque()
        self._stopped_since: dict[str, float] = {}
        self._not_ready_since: float | None = None
        self.run_state: RunState | None = None

    def log(self, message: str) -> None:
        print(f"[supervisor] {message}", file=self._log, flush=True)

    # Lifecycle
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0 after the drain) or too many restarts (exit 1)."""
        try:
            health = self._serve_health()
        except OSError as error:
            self.log(f"error: cannot serve health on port {self.health_port}: {error.strerror}; choose another with --health-port")
            return 2
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            self._start()
            while not self._stop.is_set():
                try:
                    self._watch()
                except Restart as restart:
                    if not self._restart(restart):
                        return 1
            self._drain_and_stop()
            return 0
        except ServerError as error:
            self._kill()
            if self._stop.is_set():  # a SIGTERM while (re)starting: nothing was admitted
                self.status.state = "stopped"
                return 0
            self.log(f"error: {error}")
            self.status.state = "failed"
            return 1
        finally:
            health.shutdown()

    def _on_signal(self, signum, frame) -> None:
        """Flags only: no lock, no output (a print here, interrupting one of the main thread's, fails
        with a reentrant-call error); the waits below say what a second signal did."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    def _hurried(self) -> bool:
        """True once a second SIGTERM/SIGINT came (said in the log the first time it is seen)."""
        if self._hurry.is_set() and not self._hurry_logged:
            self._hurry_logged = True
            self.log("a second SIGTERM/SIGINT: not waiting for requests any longer")
        return self._hurry.is_set()

    def _start(self) -> None:
        self.status.state = "starting"
        self.server.start(self.timing.start_timeout_s, stop_event=self._stop)
        if self.server.removed_stale:
            self.log(f"removed {len(self.server.removed_stale)} shared-memory regions and run directories of dead servers")
        self.run_state = RunState(run_directory(self.server.process.pid)).create()
        self.stubs = {stub.instance: stub for stub in stubs_of(self.server.process.pid)}
        self.status.state = "serving"
        self.log(f"tritonserver {self.server.process.pid} ready with {len(self.stubs)} Python-backend stubs; "
                 f"health on http://{self.server.host}:{self.health_port}/v2/health/ready")

    # Watching
    def _watch(self) -> None:
        """Sleep one poll interval, then look: raise Restart on the first failure found."""
        self._stop.wait(self.timing.poll_s)
        if self._stop.is_set():
            return
        now = time.monotonic()
        if self.server.process.poll() is not None:
            raise Restart("server_exited", f"tritonserver exited with code {self.server.process.returncode}", now)
        for stub in self.stubs.values():
            problem = stub_problem(stub)
            if problem == "stopped":
                self._stopped_since.setdefault(stub.instance, now)
                if now - self._stopped_since[stub.instance] < self.timing.stopped_grace_s:
                    continue
            elif problem is None:
                self._stopped_since.pop(stub.instance, None)
                continue
            self.status.stub_failures[(stub.model, problem)] += 1
            raise Restart(f"stub_{problem}", f"Python-backend stub {stub.instance} (pid {stub.pid}) {problem}", now)
        for instance in self.run_state.unhealthy_reports():
            model = instance.rsplit("_", 2)[0]
            self.status.stub_failures[(model, "not_healthy")] += 1
            raise Restart("stub_not_healthy", f"a model reported Triton's \"Stub process '{instance}' is not healthy\"", now)
        if self.server.is_ready():
            self._not_ready_since = None
        else:
            self._not_ready_since = self._not_ready_since or now
            if now - self._not_ready_since >= self.timing.not_ready_grace_s:
                raise Restart("server_not_ready", "tritonserver's /v2/health/ready failed", self._not_ready_since)
        self.status.queued, self.status.running = self.run_state.counts()

    # Recovery
    def _restart(self, restart: Restart) -> bool:
        """Restart tritonserver; False when restarts come too often to help (the pod should restart)."""
        self.status.state = "restarting"
        self.run_state.set_draining("restarting after a failed model process")
        self.status.last_detection_s = time.monotonic() - restart.since
        self.status.restarts[restart.reason] += 1
        self.log(f"{restart}: not ready; restarting tritonserver ({restart.reason})")
        now = time.monotonic()
        self._restart_times.append(now)
        while self._restart_times and now - self._restart_times[0] > self.timing.restart_window_s:
            self._restart_times.popleft()
        if len(self._restart_times) > self.timing.max_restarts:
            self.log(f"error: {len(self._restart_times)} restarts in {self.timing.restart_window_s:.0f} s: giving up "
                     "(not live; exiting 1 so that the pod restarts)")
            self.status.state = "failed"
            self._kill()
            return False
        waited = time.monotonic()
        self._wait_for_loops(self.timing.restart_drain_s)
        waited = time.monotonic() - waited
        self._kill()
        self._stopped_since, self._not_ready_since = {}, None
        started = time.monotonic()
        self._start()
        self.status.last_recovery_s = time.monotonic() - restart.since
        self.log(f"recovered in {self.status.last_recovery_s:.1f} s ({waited:.1f} s for running loops to finish, "
                 f"{time.monotonic() - started:.1f} s to start tritonserver)")
        return True

    def _wait_for_loops(self, timeout_s: float, include_queued: bool = False) -> bool:
        """Wait until no loop runs (and, for a drain, no admitted request waits); True if it came."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._hurried():
            queued, running = self.run_state.counts()
            self.status.queued, self.status.running = queued, running
            if running == 0 and (queued == 0 or not include_queued):
                return True
            if self.server.process.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    # A loop frees its admission ticket when it hands the latents on; the ensemble's vae_decoder and
    # postprocess steps follow, and a stopping tritonserver refuses them as new requests. Wait until
    # Triton's count of finished requests of the models past the loop holds still for this long: a
    # tail step longer than that (a CPU variant decoding 1536x1536 images) is not waited for.
    TAIL_QUIET_S = 1.0
    TAIL_MODELS = ("ensemble_sdxl", "vae_decoder", "postprocess")

    def _finished_requests(self) -> int | None:
        """Requests the tail models finished (success + failure), from Triton's statistics; None if unknown."""
        import json

        total = 0
        try:
            for model in self.TAIL_MODELS:
                request = urllib.request.Request(f"http://{self.server.http_url}/v2/models/{model}/stats",
                                                 headers=self.server.admin_headers())
                with urllib.request.urlopen(request, timeout=2) as response:
                    for stats in json.load(response)["model_stats"]:
                        inference = stats["inference_stats"]
                        total += inference["success"]["count"] + inference["fail"]["count"]
        except (OSError, ValueError, KeyError):
            return None
        return total

    def _wait_for_tails(self, deadline: float) -> bool:
        """True once no request finished in the tail models for TAIL_QUIET_S (or they cannot be asked)."""
        last, quiet_since = self._finished_requests(), time.monotonic()
        while time.monotonic() < deadline and not self._hurried():
            if last is None:
                return True
            time.sleep(0.1)
            now = self._finished_requests()
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= self.TAIL_QUIET_S:
                return True
        return False

    def _kill(self) -> None:
        """SIGKILL the whole process group: a server with a dead stub would wait out its exit timeout.
        Its shared-memory regions go too (too young for the start's stale-region sweep)."""
        self.server.stop(timeout_s=0, kill=True)
        remove_regions(getattr(self, "stubs", {}).values())
        if self.run_state is not None:
            self.run_state.remove()

    # Shutdown
    def _drain_and_stop(self) -> None:
        self.status.state = "draining"
        self.run_state.set_draining("draining (shutting down)")
        queued, running = self.run_state.counts()
        self.log(f"draining: not ready, admitting nothing; waiting for {queued} queued and {running} running requests "
                 f"(at most {self.timing.drain_timeout_s:.0f} s)")
        start = time.monotonic()
        drained = self._wait_for_loops(self.timing.drain_timeout_s, include_queued=True)
        if drained:  # the loops are done; their requests may still be in the ensemble's last steps
            drained = self._wait_for_tails(start + self.timing.drain_timeout_s)
        self.log(f"drain {'done' if drained else 'timed out'} in {time.monotonic() - start:.1f} s; stopping tritonserver")
        self.server.stop(timeout_s=self.timing.exit_timeout_s)
        self.run_state.remove()
        self.status.state = "stopped"

    # Health endpoint
    def _serve_health(self) -> ThreadingHTTPServer:
        status = self.status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/v2/health/ready":
                    self._send(200 if status.ready else 503, f"{status.state}\n")
                elif self.path == "/v2/health/live":
                    self._send(200 if status.live else 503, f"{status.state}\n")
                elif self.path == "/metrics":
                    self._send(200, status.metrics(), "text/plain; version=0.0.4")
                else:
                    self._send(404, "not found: /v2/health/ready, /v2/health/live, /metrics\n")

            def _send(self, code: int, body: str, content_type: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # probes every few seconds: not worth a log line each
                pass

        server = ThreadingHTTPServer((self.server.host, self.health_port), Handler)  # where tritonserver listens
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return server


class SupervisorProcess:
    """`python -m serving.server` (this supervisor) as a child process on free ports, driven as users
    drive it: what the tests and the reliability benchmarks start. It and its tritonserver each have
    their own process group; kill_everything() ends both. Its admin key is given through SDXL_ADMIN_KEY
    (`admin_key`, generated here) unless `env` or `extra_args` choose another source."""

    def __init__(self, repository: Path, log_path: Path, variant: str = "cpu", extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.ports = dict(zip(("http", "grpc", "metrics", "health"), free_ports(4)))
        self.log_path = Path(log_path)
        self.command = [sys.executable, "-m", "serving.server", "--repository", str(repository), "--variant", variant,
                        *(f"--{name}-port={port}" for name, port in self.ports.items()), *extra_args]
        env = {security.KEY_ENV: security.generate_key(), **(env or {})}
        self.admin_key = env.get(security.KEY_ENV)
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **env}, start_new_session=True,
                                        preexec_fn=dies_with(os.getpid()))
        self._server_groups: set[int] = set()

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        return security.headers(self.admin_key, protocol)

    def get(self, path: str) -> tuple[int, str]:
        """(status, body) of the health port's `path`; (0, "") when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['health']}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        return self.get("/v2/health/ready")[0] == 200

    def wait(self, ready: bool, timeout_s: float = 600) -> float:
        """Seconds until readiness is `ready`; RuntimeError, with the log's end, if the supervisor
        exits or it does not come in time."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"the supervisor exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self.ready() == ready:
                return time.monotonic() - start
            time.sleep(0.02)
        raise RuntimeError(f"not {'ready' if ready else 'unready'} after {timeout_s:.0f} s:\n{self.log_tail()}")

    def server_pid(self) -> int | None:
        """The tritonserver the supervisor runs now (None while it restarts one)."""
        try:
            for child in psutil.Process(self.process.pid).children():
                if child.name() == "tritonserver":
                    self._server_groups.add(child.pid)  # its own process group
                    return child.pid
        except psutil.NoSuchProcess:
            pass
        return None

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill_everything(self) -> None:
        """SIGKILL whatever is left of the supervisor's and its servers' process groups (a failed run)."""
        self.server_pid()
        for group in (*self._server_groups, self.process.pid):
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.process.poll() is None:
            self.process.wait(timeout=30)
        self._log.close()
