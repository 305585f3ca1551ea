"""Run a command and measure it as the OS reports it: wall time, peak resident memory (the kernel's
own high-water mark, as `/usr/bin/time -v` prints it), and the resident memory of its whole process
tree over time, attributed to the phases its log lines announce.

Linux only (reads /proc). Used by benchmarks/scale.py; no dependency beyond the standard library
and contract/layout.py (the repository root).

Also what every benchmark shares: where it writes its results (RESULTS_DIR, the directory named by
the environment variable BENCH_RESULTS (a relative path is taken from the repository root), else
build/results/ (ignored by git), so that running a benchmark leaves a clone as git has it; the
committed figures live in benchmarks/results/ (COMMITTED_RESULTS): `BENCH_RESULTS=benchmarks/results`
or a benchmark's `--out benchmarks/results/NAME` writes there), its parser's start (`bench_parser`:
--out), its result files (`save_run`: the command that reproduces them, OUT.json, OUT.md), and the
served repository it measures (`bench_server`, `started_server`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from contract.layout import REPO_ROOT

PAGE = os.sysconf("SC_PAGE_SIZE")

DEFAULT_RESULTS_DIR = REPO_ROOT / "build" / "results"  # ignored by git
COMMITTED_RESULTS = REPO_ROOT / "benchmarks" / "results"  # the figures git holds, written only when asked


def results_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$BENCH_RESULTS (relative: from the repository root) when set and not empty, else build/results."""
    value = (os.environ if environ is None else environ).get("BENCH_RESULTS", "")
    if not value:
        return DEFAULT_RESULTS_DIR
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


RESULTS_DIR = results_dir()  # where every benchmark's results go by default


def results_path(name: str) -> Path:
    """RESULTS_DIR / name: a benchmark's default output (a prefix such as engine_cpu, or a file)."""
    return RESULTS_DIR / name


def shown(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it, else as it is."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def out_help(name: str, writes: str = "OUT.json and OUT.md", note: str = "") -> str:
    """The --out help line every benchmark shares; `note` follows the default."""
    return (f"results prefix: writes {writes} (default: {shown(results_path(name))}{note}, that is "
            f"$BENCH_RESULTS/{name}, or build/results/{name} when BENCH_RESULTS is unset; "
            f"--out benchmarks/results/{name} or BENCH_RESULTS=benchmarks/results refreshes the committed figures)")


def results_env(default_out: bool = True) -> str:
    """What a recorded command needs in front of it to write where this run wrote: `BENCH_RESULTS=DIR `
    when the output went to RESULTS_DIR by default (no --out) and BENCH_RESULTS moved it from build/results."""
    if not default_out or RESULTS_DIR.resolve() == DEFAULT_RESULTS_DIR.resolve():
        return ""
    return f"BENCH_RESULTS={shlex.quote(shown(RESULTS_DIR))} "


def existing_results(path: Path, log: Callable[[str], None]) -> dict | None:
    """The results JSON at `path`, to merge a partial run into; when it is missing there, the committed
    one of the same name in benchmarks/results/ (said in a log line); None when neither exists."""
    import json

    path = Path(path)
    if path.exists():
        return json.loads(path.read_text())
    committed = COMMITTED_RESULTS / path.name
    if committed.exists():
        log(f"no {path}: merging into the committed {shown(committed)} instead (the results are written to {path})")
        return json.loads(committed.read_text())
    return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += _children(current)
    return tree


def status_kib(pid: int, key: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM...); 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    return sum(status_kib(p, "VmRSS") for p in process_tree(pid)) * 1024


@dataclass
class Phase:
    name: str
    start: float
    end: float | None = None
    peak_rss: int = 0  # bytes, sampled over the process tree


@dataclass
class Measured:
    command: list[str]
    returncode: int
    seconds: float
    max_rss: int  # bytes: the kernel's high-water mark of the largest process (ru_maxrss of the waited child)
    sampled_peak: int  # bytes: largest sampled sum over the process tree
    phases: list[Phase] = field(default_factory=list)
    log: str = ""

    def as_dict(self) -> dict:
        return {
            "command": " ".join(self.command), "returncode": self.returncode, "seconds": round(self.seconds, 1),
            "max_rss_gib": round(self.max_rss / 2**30, 2), "sampled_peak_gib": round(self.sampled_peak / 2**30, 2),
            "phases": [{"name": p.name, "seconds": round((p.end or 0) - p.start, 1), "peak_rss_gib": round(p.peak_rss / 2**30, 2)}
                       for p in self.phases],
        }


class Sampler:
    """Samples the resident memory of a process tree every `interval` s, in a thread. `pid`: the
    root process, or a function giving it (None while it has not started)."""

    def __init__(self, pid, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pid = self.pid() if callable(self.pid) else self.pid
            if pid is not None:
                self.samples.append((time.monotonic(), tree_rss_bytes(pid)))
            self._stop.wait(self.interval)

    def peak(self, start: float = 0.0, end: float | None = None) -> int:
        window = [rss for t, rss in self.samples if t >= start and (end is None or t <= end)]
        return max(window, default=0)


def run(command: list[str], *, phase_pattern: str | None = None, env: dict | None = None, log_path: Path | None = None,
        echo: bool = True, timeout_s: float | None = None) -> Measured:
    """Run `command`; a line of its combined output matching `phase_pattern` (first group: the phase
    name) starts a new phase, which lasts until the next one."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
    phases: list[Phase] = []
    lines = []
    pattern = re.compile(phase_pattern) if phase_pattern else None
    with Sampler(process.pid) as sampler:
        for line in process.stdout:
            lines.append(line)
            if echo:
                sys.stderr.write("    " + line)
            match = pattern.search(line) if pattern else None
            if match and (not phases or phases[-1].name != match.group(1)):
                now = time.monotonic()
                if phases:
                    phases[-1].end = now
                phases.append(Phase(match.group(1), now))
            if timeout_s and time.monotonic() - start > timeout_s:
                process.kill()
        _, status, usage = os.wait4(process.pid, 0)
        end = time.monotonic()
    process.returncode = os.waitstatus_to_exitcode(status)
    if phases:
        phases[-1].end = end
    for phase in phases:
        phase.peak_rss = sampler.peak(phase.start, phase.end)
    text = "".join(lines)
    if log_path:
        log_path.write_text(text)
    return Measured(command, process.returncode, end - start, usage.ru_maxrss * 1024, sampler.peak(), phases, text)


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """The median of `repeats` timed calls of `call`, after one untimed warm-up call (ONNX Runtime plans
    its first run)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def closed_loop_clients(concurrency: int, requests: int, send: Callable[[int], object], offset: int = 0) -> tuple[list, float]:
    """`concurrency` clients on threads, each sending `requests` requests one after another (client w sends
    requests offset + w x requests + k): `send(i)` sends the i-th and returns a tag. The (tag, seconds) of
    every request and the wall time; a client's error is raised once every client is done."""
    import threading

    results, errors, lock = [], [], threading.Lock()

    def client(worker: int) -> None:
        try:
            for k in range(requests):
                start = time.perf_counter()
                tag = send(offset + worker * requests + k)
                with lock:
                    results.append((tag, time.perf_counter() - start))
        except Exception as error:  # noqa: BLE001 - reported once all clients are done
            errors.append(error)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - start


def counted_tflops(cases, digits: int = 3) -> dict[str, float]:
    """TFLOP of each (name, module, args) case, one forward pass without gradients, as PyTorch's
    FlopCounterMode counts it (meta tensors do: shapes only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counted = {}
    for name, module, args in cases:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(*args)
        counted[name] = round(counter.get_total_flops() / 1e12, digits)
    return counted


def directory_sizes(root: Path, pattern: str = "*") -> dict[str, int]:
    """Bytes of each file under `root` matching `pattern`, by relative path."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(Path(root).rglob(pattern)) if p.is_file()}


def run_record(module: str, argv: list[str] | None, started: float, default_out: bool = True) -> dict:
    """What a benchmark's results start with: the command that reproduces them (with BENCH_RESULTS when
    it chose where they went: `default_out`, no --out given), the machine, the time taken."""
    import platform

    argv = sys.argv[1:] if argv is None else argv
    return {"command": results_env(default_out) + f"python -m {module}" + (" " + shlex.join(argv) if argv else ""),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "minutes": (time.time() - started) / 60}


def save_results(results: dict, out: Path, write_table, indent: int = 2, default=None, show: bool = True) -> None:
    """OUT.json (json.dumps with `indent` and `default`), and OUT.md from write_table(results, path),
    which is printed unless `show` is false."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=indent, default=default) + "\n")
    write_table(results, out.with_suffix(".md"))
    if show:
        print(out.with_suffix(".md").read_text())


def bench_parser(module: str, doc: str, results: str, writes: str = "OUT.json and OUT.md", note: str = "") -> argparse.ArgumentParser:
    """A benchmark's parser: `python -m benchmarks.<module>`, the first paragraph of its `doc`, and
    --out, the results prefix (default RESULTS_DIR/`results`). The benchmark adds its own options."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, metavar="PREFIX", default=results_path(results), help=out_help(results, writes, note))
    return parser


def save_run(module: str, argv: list[str] | None, started: float, args, parser: argparse.ArgumentParser, results: dict,
             write_table) -> dict:
    """The run's record (the command that reproduces it, the machine, the minutes) followed by
    `results`, written to args.out's OUT.json and OUT.md (write_table); returned."""
    record = run_record(f"benchmarks.{module}", argv, started, default_out=args.out == parser.get_default("out"))
    results = {**record, **results}
    save_results(results, args.out, write_table)
    return results


def bench_server(repository: Path, log_file: Path, **options):
    """A TritonServer (CPU variant) for `repository` on free ports, its log in `log_file`, not started:
    what every served benchmark measures (TritonServer's own options in `options`)."""
    from serving.server import TritonServer, free_ports

    return TritonServer(repository, "cpu", *free_ports(3), log_file=log_file, **options)


@contextmanager
def started_server(repository: Path, log_file: Path, timeout_s: float = 300, **options):
    """`repository` on a started tritonserver (`bench_server`), killed at the end: no benchmark here
    measures a shutdown, and Triton 2.51's takes about 1 s per model instance, one after another."""
    server = bench_server(repository, log_file, **options)
    server.start(timeout_s)
    try:
        yield server
    finally:
        server.stop(kill=True)
