"""Run a real `tritonserver` on the model repository: the one bundled in the nvidia-pytriton wheel.

    python -m serving.server [--variant auto|cpu|production] [--host ADDRESS] [--http-port N] [--grpc-port N]
                             [--metrics-port N] [--admin-key-file FILE]

The bundled server (2.51) has the Python backend and ensembles, no ONNX Runtime or TensorRT backend:
the `cpu` variant serves the ONNX graphs through ONNX Runtime inside Python-backend models. On a GPU
box, run NVIDIA's Triton container instead (docs/engines.md); this module is then only a convenience.
The Python-backend stubs run model.py files with this interpreter's environment (the venv), and
import this project's packages through PYTHONPATH, which this module sets.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import re
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

from contract import layout, security
from contract.layout import DEFAULT_REPOSITORY, REPO_ROOT
from contract.configs import config_problems
from contract.limits import Limits

from .processes import clean_stale_regions, clean_stale_run_directories, remove_regions, stubs_of

VARIANTS = ("cpu", "production")  # production: each model's config.pbtxt; cpu: configs/cpu.pbtxt
ENDPOINT_MODEL = "ensemble_sdxl"
# The prompt cache's default size (MiB): one CFG prompt's text encoder outputs are 2 x (77 x 2048 + 1280)
# fp16 values, 636 KiB at SDXL's widths, so about 100 prompts.
PROMPT_CACHE_MB = 64
# Request traces (--trace-file): Triton's default rate, and how many traces go to each numbered file (it
# writes a file when that many are done; the rest at shutdown).
TRACE_RATE = 1000
TRACE_LOG_FREQUENCY = 100
# Triton's log line for a model that did not load (model_lifecycle.cc): the model and the reason.
FAILED_LOAD = re.compile(r"failed to load '([^']+)'(?: version \d+)?: (.*)")

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
        """$TRITONSERVER where it is set (the container image: NVIDIA's server for both variants); else
        cpu: the bundled server; production: a `tritonserver` on PATH (NVIDIA's container); the bundled
        one cannot serve it (no TensorRT backend)."""
        if os.environ.get("TRITONSERVER"):
            return cls(Path(os.environ["TRITONSERVER"]), None, None)
        if variant == "cpu":
            return cls.bundled()
        explicit = shutil.which("tritonserver")
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

    def environment(self) -> dict[str, str]:
        """The environment tritonserver runs in: this one, with the libraries it needs, and without
        the admin key (it gets the key on its command line; its models have no use for it)."""
        env = {key: value for key, value in os.environ.items() if key != security.KEY_ENV}
        # The stub links libpython3.X.so: it must be this interpreter's, or its stdlib extension
        # modules (ssl...) fail on missing symbols; then the bundled server's own libraries.
        python_libdir = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (python_libdir, self.libraries and str(self.libraries), env.get("LD_LIBRARY_PATH")) if p
        )
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        # The stubs must run this interpreter's environment (numpy < 2, torch, onnxruntime).
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def supports(self, option: str) -> bool:
        """Whether this tritonserver has a command-line option (its --help lists it): flags arrive
        with releases (--http-max-input-size in 25.06)."""
        return option in _help_text(self)


@functools.lru_cache(maxsize=None)
def _help_text(install: TritonInstall) -> str:
    result = subprocess.run([str(install.binary), "--help"], env=install.environment(), capture_output=True, text=True,
                            timeout=30)
    return result.stdout + result.stderr


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports. The sockets stay bound until all are chosen: ports taken
    one at a time can repeat (CI saw HTTP and gRPC given the same port)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class TritonServer:
    """A tritonserver process: start() waits until /v2/health/ready answers 200; stop() ends it.

    Secure by default: it listens on `host` (loopback unless asked), and its admin APIs answer only
    calls that carry `admin_key` (generated per server unless given; admin_headers() sends it)."""

    repository: Path = DEFAULT_REPOSITORY
    variant: str = "cpu"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None  # None: inherit stdout/stderr
    host: str = security.LOOPBACK  # the address HTTP, gRPC and metrics listen on
    admin_key: str = field(default_factory=security.generate_key, repr=False)
    # --http-max-input-size (bytes), passed where the server has the option (25.06 and later); None: its default.
    max_input_size: int | None = None
    extra_args: list[str] = field(default_factory=list)
    check_configs: bool = True  # refuse to start on configs that disagree with the graphs (check_repository)
    exit_timeout_s: int = 30  # Triton's --exit-timeout-secs: how long its own shutdown may wait for requests
    # The prompt cache: bytes of Triton's local response cache, which the text_encoder's config enables
    # (its outputs per distinct token ids and text LoRAs); 0: none (docs/serving.md, "The prompt cache").
    prompt_cache_bytes: int = PROMPT_CACHE_MB << 20
    # Triton's request traces (timestamps of each traced request and of its BLS callees, under it), to
    # <trace_file>.0, .1 ... every trace_log_frequency traces; None: none (docs/serving.md, "Tracing a request").
    # The file can only be named at start: the trace API (admin key) then changes the rate and level.
    trace_file: Path | None = None
    trace_rate: int = TRACE_RATE  # one request in this many is traced
    trace_log_frequency: int = TRACE_LOG_FREQUENCY
    process: subprocess.Popen | None = None
    removed_stale: list[str] = field(default_factory=list)  # what the last start() cleaned up
    _log: object = None

    def trace_args(self) -> list[str]:
        if self.trace_file is None:
            return []
        settings = (f"triton,file={self.trace_file}", f"triton,log-frequency={self.trace_log_frequency}", "level=TIMESTAMPS",
                    f"rate={self.trace_rate}")
        return [argument for setting in settings for argument in ("--trace-config", setting)]

    def command(self, install: TritonInstall) -> list[str]:
        """tritonserver's command line. It holds the admin key (Triton takes it nowhere else): log
        redacted_command() instead."""
        args = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            *security.restriction_args(self.admin_key),
            "--exit-on-error=true",
            "--strict-readiness=true",
            # Our configs are complete (tests check them against the graphs): without this, the Python
            # backend starts one more process per model only to ask model.py for a config, importing
            # each model's modules twice (4.9 s of a 14 s start: benchmarks/results/start_cpu.md).
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *([f"--cache-config=local,size={self.prompt_cache_bytes}"] if self.prompt_cache_bytes > 0 else []),
            *self.trace_args(),
            *self.extra_args,
        ]
        if install.backends is not None:
            args.append(f"--backend-directory={install.backends}")
            caches = install.backends.parent / "caches"  # the bundled server's; NGC images: /opt/tritonserver/caches
            if self.prompt_cache_bytes > 0 and caches.is_dir():
                args.append(f"--cache-directory={caches}")
        if self.variant == "cpu":
            args += ["--model-config-name=cpu"]
        if self.max_input_size is not None and install.supports("--http-max-input-size"):
            args.append(f"--http-max-input-size={self.max_input_size}")
        return args

    def redacted_command(self, install: TritonInstall) -> list[str]:
        return security.redact(self.command(install), self.admin_key)

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """What a call to an admin API (statistics, model config, repository...) sends: the key."""
        return security.headers(self.admin_key, protocol)

    @property
    def connect_host(self) -> str:
        """Where a local client reaches it: loopback when it listens on every address."""
        return security.LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.connect_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.connect_host}:{self.grpc_port}"

    def start(self, timeout_s: float = 300, stop_event=None) -> "TritonServer":
        """Start and wait until ready; `stop_event` (a threading.Event) set meanwhile aborts the start."""
        if self.variant not in VARIANTS:
            raise ServerError(f"variant {self.variant!r}: expected one of {', '.join(VARIANTS)}")
        install = TritonInstall.for_variant(self.variant)
        if self.check_configs:
            check_repository(self.repository, self.variant)
        # A killed server leaves its shared-memory regions (and admission state) behind.
        self.removed_stale = clean_stale_regions() + clean_stale_run_directories()
        if self.trace_file is not None:  # Triton writes into it, but does not make it
            self.trace_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "w") if self.log_file else None  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            self.command(install), env=install.environment(), stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
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
        read = 0  # how far the log has been searched for a failed model load
        while time.monotonic() < deadline:
            if stop_event is not None and stop_event.is_set():
                self.stop(kill=True)
                raise ServerError("stopped while starting")
            if self.process.poll() is not None:
                self.stop()
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting{self._log_hint()}")
            if self.is_ready():
                return
            read, failed = self._failed_load(read)
            if failed:  # Triton 2.51 exits on it only after unloading the rest (about 10 s): the start has failed now
                self.stop(kill=True)
                raise ServerError(f"model {failed[0]} failed to load: {failed[1]}{self._log_hint()}")
            time.sleep(0.1)  # a ready server is found within 0.1 s (a start takes seconds: benchmarks/results/start_cpu.md)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s{self._log_hint()}")

    def _failed_load(self, offset: int) -> tuple[int, tuple[str, str] | None]:
        """(where the log has been read to, (model, reason) of the first failed model load in it, or None);
        without a log file, nothing to read."""
        if not self.log_file or not Path(self.log_file).exists():
            return offset, None
        with open(self.log_file, "rb") as log:
            log.seek(offset)
            text = log.read()
        complete = text.rfind(b"\n") + 1  # whole lines only: the rest is read again next time
        match = FAILED_LOAD.search(text[:complete].decode("utf-8", "replace"))
        return offset + complete, ((match.group(1), match.group(2).strip().rstrip('"')[:300]) if match else None)

    def _log_hint(self) -> str:
        if not self.log_file or not Path(self.log_file).exists():
            return ""
        tail = Path(self.log_file).read_text(errors="replace").splitlines()[-30:]
        return f"; last lines of {self.log_file}:\n" + "\n".join(tail)

    def stop(self, timeout_s: float = 60, kill: bool = False) -> None:
        """SIGINT (Triton's clean shutdown), then SIGKILL for whatever of its process group is left
        (a Python-backend stub that outlived the server, or a server that hangs). kill: SIGKILL at
        once, and the shared-memory regions its stubs leave are removed; for a server whose shutdown
        nobody waits for (Triton 2.51 ends a model's instances one after another, about 1 s each:
        6 s for this repository's 21)."""
        if self.process is None:
            return
        stubs = stubs_of(self.process.pid) if kill else []
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
        if kill:  # what Triton's own shutdown would have removed
            remove_regions(stubs)
            clean_stale_run_directories()
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


def exposure_warning(host: str, ports: dict[str, int]) -> str | None:
    """What listening on a non-loopback address exposes, for the operator who asked for it."""
    if security.is_loopback(host):
        return None
    return (f"warning: listening on {host}, reachable from other machines: HTTP {ports['http']} and gRPC "
            f"{ports['grpc']} (inference, health and metadata for anyone, with no authentication: put a "
            f"NetworkPolicy or an authenticating proxy in front; the admin APIs need the admin key), metrics "
            f"{ports['metrics']} and health {ports['health']} (open); docs/security.md")


def admin_key(key_file: Path | None, generated_file: Path, log) -> str:
    """SDXL_ADMIN_KEY, else the key in `key_file`, else a new key written to `generated_file` (mode 600)
    for the local tools. The key itself is never printed."""
    if os.environ.get(security.KEY_ENV):
        log(f"admin key: from {security.KEY_ENV}")
        return security.check_key(os.environ[security.KEY_ENV].strip(), security.KEY_ENV)
    if key_file is not None:
        log(f"admin key: from {key_file}")
        return security.read_key_file(key_file)
    key = security.generate_key()
    try:
        security.write_key_file(generated_file, key)
        log(f"admin key: generated for this start, in {generated_file} (mode 600), where make perf and "
            f"python -m client --info find it; set {security.KEY_ENV} or --admin-key-file to choose one")
    except OSError as error:
        log(f"warning: admin key generated for this start, but {generated_file} cannot be written ({error.strerror}): "
            f"no one can call the admin APIs; set {security.KEY_ENV} or --admin-key-file to choose a key")
    return key


def main(argv: list[str] | None = None) -> int:
    from .supervisor import Supervisor, Timing

    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--variant", choices=(*VARIANTS, "auto"), default=os.environ.get("VARIANT") or "auto",
                        help="cpu (configs/cpu.pbtxt), production (config.pbtxt), auto (default: production "
                             "when a GPU and the TensorRT plans are there)")
    parser.add_argument("--host", default=os.environ.get("HOST") or security.LOOPBACK,
                        help="the address every port listens on (default %(default)s: this machine only; 0.0.0.0: "
                             "every interface, as a container needs; a warning names what is then exposed)")
    parser.add_argument("--http-port", type=int, default=_number("HTTP_PORT", 8000))
    parser.add_argument("--grpc-port", type=int, default=_number("GRPC_PORT", 8001))
    parser.add_argument("--metrics-port", type=int, default=_number("METRICS_PORT", 8002))
    parser.add_argument("--health-port", type=int, default=_number("HEALTH_PORT", 8003),
                        help="the supervisor's /v2/health/ready, /v2/health/live and /metrics (the probes' port)")
    parser.add_argument("--admin-key-file", type=Path, default=os.environ.get("SDXL_ADMIN_KEY_FILE") or None,
                        help=f"the file holding the key of Triton's admin APIs (default: ${security.KEY_ENV}, else a "
                             "key generated per start and written to --generated-admin-key-file)")
    parser.add_argument("--generated-admin-key-file", type=Path, default=security.GENERATED_KEY_FILE,
                        help="where a generated key is written, mode 600 (default %(default)s)")
    parser.add_argument("--prompt-cache-mb", type=int, default=_number("PROMPT_CACHE_MB", PROMPT_CACHE_MB),
                        help="MiB of the prompt cache (the text encoder's outputs per distinct prompt, negative prompt and "
                             "text LoRAs; default %(default)s: about 100 CFG prompts at SDXL's widths in fp16); 0: none")
    parser.add_argument("--http-max-input-size", type=int, default=Limits().max_request_bytes,
                        help="bytes of one HTTP request at most, where the tritonserver has the option (25.06 and "
                             "later; default %(default)s: the largest legal request with a quarter of margin)")
    parser.add_argument("--trace-file", type=Path, default=os.environ.get("TRACE_FILE") or None,
                        help="write Triton's request traces (timestamps, with each request's BLS callees under it) to "
                             "FILE.0, FILE.1 ... (default: no tracing)")
    parser.add_argument("--trace-rate", type=int, default=_number("TRACE_RATE", TRACE_RATE),
                        help="with --trace-file: trace one request in this many (default %(default)s)")
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
    if args.prompt_cache_mb < 0:
        parser.error(f"--prompt-cache-mb {args.prompt_cache_mb}: expected a number of MiB, 0 (no cache) or more")
    if args.trace_rate < 1:
        parser.error(f"--trace-rate {args.trace_rate}: expected a whole number, at least 1 (1: every request)")
    if args.http_max_input_size < 1:
        parser.error(f"--http-max-input-size {args.http_max_input_size}: expected a number of bytes, at least 1")

    def log(message: str) -> None:
        print(f"[serve] {message}", file=sys.stderr, flush=True)

    variant = auto_variant(args.repository) if args.variant == "auto" else args.variant
    try:
        install = TritonInstall.for_variant(variant)
        check_exported(args.repository, variant)
        check_repository(args.repository, variant)
        key = admin_key(args.admin_key_file, args.generated_admin_key_file, log)
    except (ServerError, security.AdminKeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    timing = Timing(drain_timeout_s=args.drain_timeout_s, exit_timeout_s=args.exit_timeout_s,
                    start_timeout_s=args.start_timeout_s, max_restarts=args.max_restarts)
    server = TritonServer(args.repository, variant, args.http_port, args.grpc_port, args.metrics_port,
                          exit_timeout_s=args.exit_timeout_s, host=args.host, admin_key=key,
                          max_input_size=args.http_max_input_size, prompt_cache_bytes=args.prompt_cache_mb << 20,
                          trace_file=args.trace_file and args.trace_file.absolute(), trace_rate=args.trace_rate)
    ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port, "health": args.health_port}
    if warning := exposure_warning(args.host, ports):
        log(warning)
    if not install.supports("--http-max-input-size"):
        log("this tritonserver has no --http-max-input-size (25.06 and later): a request's body is read whole before "
            "the endpoint's checks bound its inputs (docs/security.md)")
    log(f"variant {variant}: {' '.join(server.redacted_command(install))}")
    log(f"ready when http://{server.connect_host}:{args.health_port}/v2/health/ready answers 200; SIGTERM drains "
        f"(at most {timing.shutdown_budget_s:.0f} s: the pod's terminationGracePeriodSeconds)")
    code = Supervisor(server, timing, args.health_port).run()
    if not os.environ.get(security.KEY_ENV) and args.admin_key_file is None:
        _forget_generated_key(args.generated_admin_key_file, key)
    return code


def _forget_generated_key(path: Path, key: str) -> None:
    """Remove this start's generated key file, unless another start has replaced it since."""
    try:
        if security.read_key_file(path) == key:
            path.unlink()
    except (security.AdminKeyError, OSError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
