"""Run a real `tritonserver` on the model repository: the one bundled in the nvidia-pytriton wheel.

    python -m serving.server [--variant auto|cpu|production] [--http-port N] [--grpc-port N] [--metrics-port N]

The bundled server (2.51) has the Python backend and ensembles, no ONNX Runtime or TensorRT backend:
the `cpu` variant serves the ONNX graphs through ONNX Runtime inside Python-backend models. On a GPU
box, run NVIDIA's Triton container instead (docs/engines.md); this module is then only a convenience.
The Python-backend stubs run model.py files with this interpreter's environment (the venv), and
import this project's packages through PYTHONPATH, which this module sets.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from contract import layout
from contract.layout import DEFAULT_REPOSITORY, REPO_ROOT
from contract.configs import config_problems

from .processes import clean_stale_regions, clean_stale_run_directories

VARIANTS = ("cpu", "production")  # production: each model's config.pbtxt; cpu: configs/cpu.pbtxt
ENDPOINT_MODEL = "ensemble_sdxl"

# prctl(2): PR_SET_PDEATHSIG asks the kernel to signal a process when the thread that forked it
# exits. Resolved here, in the parent: the child between fork and exec must not load libraries.
PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


class ServerError(RuntimeError):
    pass


def dies_with(parent_pid: int):
    """preexec_fn for tritonserver: SIGKILL when its parent (the supervisor, a test, a benchmark)
    dies, however it dies (SIGKILL and the OOM killer included), so that no server is left serving
    unsupervised on the ports; its Python-backend stubs see their parent gone and exit (measured:
    tests/test_supervisor.py). Tied to the forking thread: start servers from a thread that lives
    as long as they do (all callers use the main thread)."""

    def set_death_signal() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return set_death_signal


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path | None  # None: the server's own default (/opt/tritonserver/backends in NGC images)
    libraries: Path | None

    @classmethod
    def for_variant(cls, variant: str) -> "TritonInstall":
        """cpu: the bundled server. production: $TRITONSERVER, else a `tritonserver` on PATH (NVIDIA's
        container); the bundled one cannot serve it (no TensorRT backend)."""
        if variant == "cpu":
            return cls.bundled()
        explicit = os.environ.get("TRITONSERVER") or shutil.which("tritonserver")
        if not explicit:
            raise ServerError(
                "the production variant needs NVIDIA's tritonserver with the TensorRT backend (the bundled 2.51 server has "
                "the Python backend only): run in the container nvcr.io/nvidia/tritonserver:<release>-py3 (docs/engines.md, "
                "\"Production on a GPU\") or set TRITONSERVER=/path/to/tritonserver; without a GPU, use --variant cpu"
            )
        return cls(Path(explicit), None, None)

    @classmethod
    def bundled(cls) -> "TritonInstall":
        """The tritonserver of the nvidia-pytriton wheel, with the Python-backend stub for this Python."""
        site = Path(sysconfig.get_paths()["purelib"])
        root = site / "pytriton" / "tritonserver"
        install = cls(root / "bin" / "tritonserver", root / "backends", site / "nvidia_pytriton.libs")
        if not install.binary.exists():
            raise ServerError(f"no tritonserver at {install.binary}: run `make install` (it installs nvidia-pytriton)")
        stub = install.backends / "python" / "triton_python_backend_stub"
        if not stub.exists():
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            source = root / "python_backend_stubs" / version / "triton_python_backend_stub"
            if not source.exists():
                raise ServerError(f"the bundled Python backend has no stub for Python {version}")
            shutil.copy2(source, stub)
        return install


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A tritonserver process: start() waits until /v2/health/ready answers 200; stop() ends it."""

    repository: Path = DEFAULT_REPOSITORY
    variant: str = "cpu"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None  # None: inherit stdout/stderr
    extra_args: list[str] = field(default_factory=list)
    check_configs: bool = True  # refuse to start on configs that disagree with the graphs (check_repository)
    exit_timeout_s: int = 30  # Triton's --exit-timeout-secs: how long its own shutdown may wait for requests
    process: subprocess.Popen | None = None
    removed_stale: list[str] = field(default_factory=list)  # what the last start() cleaned up
    _log: object = None

    def command(self, install: TritonInstall) -> list[str]:
        args = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *self.extra_args,
        ]
        if install.backends is not None:
            args.append(f"--backend-directory={install.backends}")
        if self.variant == "cpu":
            args += ["--model-config-name=cpu"]
        return args

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython3.X.so: it must be this interpreter's, or its stdlib extension
        # modules (ssl...) fail on missing symbols; then the bundled server's own libraries.
        python_libdir = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (python_libdir, install.libraries and str(install.libraries), env.get("LD_LIBRARY_PATH")) if p
        )
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        # The stubs must run this interpreter's environment (numpy < 2, torch, onnxruntime).
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 300, stop_event=None) -> "TritonServer":
        """Start and wait until ready; `stop_event` (a threading.Event) set meanwhile aborts the start."""
        if self.variant not in VARIANTS:
            raise ServerError(f"variant {self.variant!r}: expected one of {', '.join(VARIANTS)}")
        install = TritonInstall.for_variant(self.variant)
        if self.check_configs:
            check_repository(self.repository, self.variant)
        # A killed server leaves its shared-memory regions (and admission state) behind.
        self.removed_stale = clean_stale_regions() + clean_stale_run_directories()
        self._log = open(self.log_file, "w") if self.log_file else None  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            self.command(install), env=self.environment(install), stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,  # its own process group: stop() also ends the Python-backend stubs
            preexec_fn=dies_with(os.getpid()),
        )
        self.wait_ready(timeout_s, stop_event)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float, stop_event=None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop_event is not None and stop_event.is_set():
                self.stop(kill=True)
                raise ServerError("stopped while starting")
            if self.process.poll() is not None:
                self.stop()
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting{self._log_hint()}")
            if self.is_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        if not self.log_file or not Path(self.log_file).exists():
            return ""
        tail = Path(self.log_file).read_text(errors="replace").splitlines()[-30:]
        return f"; last lines of {self.log_file}:\n" + "\n".join(tail)

    def stop(self, timeout_s: float = 60, kill: bool = False) -> None:
        """SIGINT (Triton's clean shutdown), then SIGKILL for whatever of its process group is left
        (a Python-backend stub that outlived the server, or a server that hangs); kill: SIGKILL at once."""
        if self.process is None:
            return
        if self.process.poll() is None and not kill:
            try:
                self.process.send_signal(signal.SIGINT)  # the server only: it ends its stubs itself
                self.process.wait(timeout=timeout_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def check_exported(repository: Path, variant: str) -> None:
    """What `make serve` checks first: a repository the export assembled, with its graphs (cpu)."""
    export = (f"export first: `make export-tiny` (the tiny random-weight model, CPU) or `python -m export onnx "
              f"--out {repository}`")
    if not (Path(repository) / ENDPOINT_MODEL / "config.pbtxt").exists():
        raise ServerError(f"{repository}: not a model repository (no {ENDPOINT_MODEL}/config.pbtxt); {export}")
    missing = [name for name in layout.served_networks(repository) if not layout.onnx_path(repository, name).exists()]
    if variant == "cpu" and missing:
        raise ServerError(f"no ONNX graphs ({', '.join(f'{n}/{layout.VERSION}/{layout.ONNX_FILE}' for n in missing)}) "
                          f"in {repository}; {export}")


def check_repository(repository: Path, variant: str) -> None:
    """Refuse to start on what would fail to load, with the command that fixes it: missing TensorRT
    plans (production), configs that disagree with the exported graphs' dtypes or widths (Triton's
    TensorRT backend has its own terser message)."""
    problems = []
    if variant == "production":
        missing = [name for name in layout.served_networks(repository)
                   if not (layout.version_dir(repository, name) / layout.ENGINE_FILE).exists()]
        if missing:
            problems.append(f"no TensorRT plans ({', '.join(f'{n}/{layout.VERSION}/{layout.ENGINE_FILE}' for n in missing)}) "
                            f"in {repository}: build them with `make engines` (a GPU and TensorRT: `make install-gpu`), "
                            "or serve the ONNX graphs with --variant cpu")
    problems += config_problems(repository, variant)
    if problems:
        raise ServerError("\n".join(problems))


def auto_variant(repository: Path) -> str:
    """production where a GPU is visible and every TensorRT plan is in place, cpu otherwise."""
    plans = all((layout.version_dir(repository, name) / layout.ENGINE_FILE).exists() for name in layout.served_networks(repository))
    has_gpu = shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True
    ).returncode == 0
    return "production" if plans and has_gpu else "cpu"


def _number(name: str, default):
    """A default from the environment (the Makefile's and the container's settings)."""
    return type(default)(os.environ.get(name, default))


def main(argv: list[str] | None = None) -> int:
    from .supervisor import Supervisor, Timing

    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--variant", choices=(*VARIANTS, "auto"), default=os.environ.get("VARIANT") or "auto",
                        help="cpu (configs/cpu.pbtxt), production (config.pbtxt), auto (default: production "
                             "when a GPU and the TensorRT plans are there)")
    parser.add_argument("--http-port", type=int, default=_number("HTTP_PORT", 8000))
    parser.add_argument("--grpc-port", type=int, default=_number("GRPC_PORT", 8001))
    parser.add_argument("--metrics-port", type=int, default=_number("METRICS_PORT", 8002))
    parser.add_argument("--health-port", type=int, default=_number("HEALTH_PORT", 8003),
                        help="the supervisor's /v2/health/ready, /v2/health/live and /metrics (the probes' port)")
    defaults = Timing()
    parser.add_argument("--drain-timeout-s", type=float, default=_number("DRAIN_TIMEOUT_S", defaults.drain_timeout_s),
                        help="on SIGTERM, how long admitted requests may take to finish (default %(default)s)")
    parser.add_argument("--exit-timeout-s", type=int, default=_number("EXIT_TIMEOUT_S", defaults.exit_timeout_s),
                        help="then tritonserver's own shutdown (--exit-timeout-secs, default %(default)s)")
    parser.add_argument("--start-timeout-s", type=float, default=_number("START_TIMEOUT_S", defaults.start_timeout_s),
                        help="how long tritonserver may take to load the models (default %(default)s)")
    parser.add_argument("--max-restarts", type=int, default=_number("MAX_RESTARTS", defaults.max_restarts),
                        help=f"restarts within {defaults.restart_window_s:.0f} s before the supervisor gives up and exits 1")
    args = parser.parse_args(argv)
    variant = auto_variant(args.repository) if args.variant == "auto" else args.variant
    try:
        install = TritonInstall.for_variant(variant)
        check_exported(args.repository, variant)
        check_repository(args.repository, variant)
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    timing = Timing(drain_timeout_s=args.drain_timeout_s, exit_timeout_s=args.exit_timeout_s,
                    start_timeout_s=args.start_timeout_s, max_restarts=args.max_restarts)
    server = TritonServer(args.repository, variant, args.http_port, args.grpc_port, args.metrics_port,
                          exit_timeout_s=args.exit_timeout_s)
    print(f"[serve] variant {variant}: {' '.join(server.command(install))}", file=sys.stderr, flush=True)
    print(f"[serve] ready when http://127.0.0.1:{args.health_port}/v2/health/ready answers 200; SIGTERM drains "
          f"(at most {timing.shutdown_budget_s:.0f} s: the pod's terminationGracePeriodSeconds)", file=sys.stderr, flush=True)
    return Supervisor(server, timing, args.health_port).run()


if __name__ == "__main__":
    raise SystemExit(main())
