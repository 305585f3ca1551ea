"""Where a server start goes: `make serve` launched to ready, per model, per process, and imports.

    python -m benchmarks.start [--runs 3] [--repository build/model_repository] [--checkout DIR]
                               [--out build/results/start_cpu]              (make bench-start; about a minute)

On the repository `make demo` serves (the tiny model, CPU variant; `make bench-start` exports it first):

1. `runs`: `make serve` launched (in its own process group, on free ports) until the supervisor's
   /v2/health/ready answers 200, polled every 20 ms; then SIGTERM to the group. The median is the figure.
2. `models`: per model, from tritonserver's log (the last run): seconds from its "loading" line to its
   "successfully loaded" line, and when it was ready, from the first "loading".
3. `processes`: per Python-backend process at ready (the last run): CPU seconds spent (its start,
   imports and initialize), resident memory, and which heavy native libraries it has loaded.
4. `imports`: per model module (`serving/triton/*_model.py`), `python -X importtime` of its import
   in a fresh interpreter: seconds in all, and the packages that cost most.

`--checkout DIR` launches `make serve` in another checkout (with this one's venv and repository): a
before/after comparison on one machine.
Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results refreshes the committed ones.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import psutil

from contract.layout import DEFAULT_REPOSITORY, REPO_ROOT
from serving.server import free_ports

from .measure import bench_parser, save_run

# Native libraries whose presence in a process's memory map tells which heavy package it imported.
LIBRARIES = {"torch": "libtorch_cpu", "onnxruntime": "onnxruntime_pybind11_state", "tokenizers": "/tokenizers/",
             "PIL": "/PIL/_imaging", "cv2": "/cv2/", "grpc": "cygrpc"}
MODEL_MODULES = ("tokenizer_model", "scheduler_model", "denoiser_model", "stream_model", "postprocess_model",
                 "library_model", "onnx_model")
POLL_S = 0.02
# Triton's log line: I1207 04:50:10.142010 2701 model_lifecycle.cc:839] "successfully loaded 'scheduler'"
LOG_TIME = re.compile(r"^[IWE]\d{4} (\d\d:\d\d:\d\d\.\d+) .*?\] \"(loading: (\w+):\d+|successfully loaded '(\w+)')\"")


def log(message: str) -> None:
    print(f"[start] {message}", file=sys.stderr, flush=True)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def launch(checkout: Path, repository: Path, log_path: Path, timeout_s: float = 300) -> tuple[float, subprocess.Popen, int]:
    """`make serve` on free ports, timed from its launch until ready: (seconds, the make process, health port)."""
    http, grpc, metrics, health = free_ports(4)
    command = ["make", "--no-print-directory", "serve", f"REPOSITORY={repository}", f"VENV={REPO_ROOT / '.venv'}",
               "VARIANT=cpu", f"HTTP_PORT={http}", f"GRPC_PORT={grpc}", f"METRICS_PORT={metrics}", f"HEALTH_PORT={health}"]
    env = {**os.environ, "SDXL_ADMIN_KEY": "bench-start-" + "k" * 20}  # not the clone's build/admin-key
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=checkout, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    while not ready(health):
        if process.poll() is not None or time.perf_counter() - start > timeout_s:
            stop(process)
            raise RuntimeError(f"make serve did not become ready (exit {process.returncode}); log: {log_path}")
        time.sleep(POLL_S)
    return time.perf_counter() - start, process, health


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to make and the supervisor (one process group), as a terminal's Ctrl-C or a pod's stop."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tritonserver_of(make: subprocess.Popen) -> psutil.Process:
    return next(p for p in psutil.Process(make.pid).children(recursive=True) if p.name() == "tritonserver")


def processes(server: psutil.Process) -> list[dict]:
    """Each Python-backend process: its instance, CPU seconds so far, resident MiB, heavy libraries loaded."""
    from serving.processes import stubs_of

    rows = []
    for stub in stubs_of(server.pid):
        process = psutil.Process(stub.pid)
        cpu = process.cpu_times()
        maps = Path(f"/proc/{stub.pid}/maps").read_text()
        rows.append({"instance": stub.instance, "model": stub.model, "cpu_s": round(cpu.user + cpu.system, 2),
                     "rss_mib": round(process.memory_info().rss / 2**20),
                     "libraries": [name for name, pattern in LIBRARIES.items() if pattern in maps]})
    return sorted(rows, key=lambda row: row["instance"])


def model_load_times(log_text: str) -> list[dict]:
    """Per model: seconds from tritonserver's "loading" line to "successfully loaded", and ready at (s after the first)."""
    started, loaded = {}, {}
    for line in log_text.splitlines():
        match = LOG_TIME.match(line)
        if not match:
            continue
        moment = datetime.strptime(match.group(1), "%H:%M:%S.%f")
        if match.group(3):
            started.setdefault(match.group(3), moment)
        else:
            loaded[match.group(4)] = moment
    if not started:
        return []
    first = min(started.values())
    return sorted(({"model": model, "load_s": round((loaded[model] - moment).total_seconds(), 2),
                    "ready_at_s": round((loaded[model] - first).total_seconds(), 2)}
                   for model, moment in started.items() if model in loaded), key=lambda row: row["ready_at_s"])


IMPORT_PROBE = """
import sys, types
class Backend(types.ModuleType):  # triton_python_backend_utils exists only inside the stub
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (Exception,), {})
sys.modules["triton_python_backend_utils"] = Backend("triton_python_backend_utils")
import serving.triton.{module}
"""


def module_imports(module: str) -> dict:
    """`python -X importtime` of one model module: seconds in all, and the top-level packages that cost most."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORT_PROBE.replace("{module}", module)], cwd=REPO_ROOT,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"importing serving.triton.{module} failed:\n{result.stderr[-2000:]}")
    packages: dict[str, int] = {}
    total = 0
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if not match:
            continue
        self_us, name = int(match.group(1)), match.group(4)
        total += self_us
        top = name.split(".")[0]
        packages[top] = packages.get(top, 0) + self_us
    heaviest = sorted(packages.items(), key=lambda item: -item[1])[:5]
    return {"module": module, "seconds": round(total / 1e6, 2), "heaviest": [(name, round(us / 1e6, 2)) for name, us in heaviest]}


def run(args) -> dict:
    repository = args.repository.resolve()
    if not (repository / "ensemble_sdxl" / "config.pbtxt").exists():
        raise SystemExit(f"error: {repository} is not an exported repository: run make export-tiny first (make bench-start does)")
    work = REPO_ROOT / "build" / "start-logs"  # each run's make serve output
    work.mkdir(parents=True, exist_ok=True)
    seconds, last = [], {}
    for index in range(args.runs):
        log_path = work / f"serve-{index}.log"
        took, make, _ = launch(args.checkout, repository, log_path)
        seconds.append(round(took, 2))
        log(f"run {index + 1}/{args.runs}: ready {took:.2f} s after the launch of make serve")
        if index == args.runs - 1:
            last["processes"] = processes(tritonserver_of(make))
        stop(make)
        if index == args.runs - 1:
            last["models"] = model_load_times(log_path.read_text(errors="replace"))
    log("imports of each model module")
    imports = [module_imports(module) for module in MODEL_MODULES]
    return {"repository": str(repository), "checkout": str(args.checkout), "launch_to_ready_s": seconds,
            "median_s": statistics.median(seconds), **last, "imports": imports}


def write_table(results: dict, path: Path) -> None:
    procs = results["processes"]
    lines = ["# Server start: `make serve` launched to ready (tiny model, CPU variant)", "",
             f"`{results['command']}` on {results['machine']}, {results['date']}; checkout {results['checkout']}.", "",
             f"**Launch of `make serve` to ready: {results['median_s']:.2f} s** (median of {len(results['launch_to_ready_s'])}: "
             + ", ".join(f"{s:.2f}" for s in results["launch_to_ready_s"]) + " s).", "",
             "## Per model (tritonserver's log, the last run)", "",
             "| model | loading to loaded | ready at (from the first loading) |", "|---|---|---|"]
    lines += [f"| {m['model']} | {m['load_s']:.2f} s | {m['ready_at_s']:.2f} s |" for m in results["models"]]
    lines += ["", "## Per Python-backend process at ready (the last run)", "",
              f"CPU seconds of all of them: {sum(p['cpu_s'] for p in procs):.1f} s on {os.cpu_count()} cores; "
              f"resident memory: {sum(p['rss_mib'] for p in procs):,} MiB.", "",
              "| process | CPU | resident | heavy native libraries loaded |", "|---|---|---|---|"]
    lines += [f"| {p['instance']} | {p['cpu_s']:.2f} s | {p['rss_mib']} MiB | {', '.join(p['libraries']) or '-'} |" for p in procs]
    lines += ["", "## Imports of each model module (`python -X importtime`, a fresh interpreter)", "",
              "What `import serving.triton.<module>` costs; what `initialize` imports besides (the scheduler class, "
              "the tokenizers, ONNX Runtime's session) shows in the processes' CPU above.", "",
              "| module | seconds | heaviest packages |", "|---|---|---|"]
    lines += [f"| {i['module']} | {i['seconds']:.2f} | " + ", ".join(f"{n} {s:.2f} s" for n, s in i["heaviest"]) + " |"
              for i in results["imports"]]
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("start", __doc__, "start_cpu")
    parser.add_argument("--runs", type=int, default=3, help="launches of make serve (default %(default)s)")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY,
                        help="the exported repository to serve (default: make demo's, %(default)s)")
    parser.add_argument("--checkout", type=Path, default=REPO_ROOT,
                        help="the checkout whose make serve is launched (default: this one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: expected at least 1")
    started = time.time()
    save_run("start", argv, started, args, parser, {"date": time.strftime("%Y-%m-%d"), **run(args)}, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
