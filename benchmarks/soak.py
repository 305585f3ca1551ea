"""Soak test: thousands of mixed requests against the supervised server, watching its memory.

    python -m benchmarks.soak [--requests 2000] [--concurrency 8] [--out build/results/soak]

What it does, on the tiny pipeline (CPU variant, fp32 graphs, this repository's configs and models):
1. exports the tiny SDXL (base + LoRA stand-in fused + alternative VAE) into a temporary model
   repository;
2. starts the server the way users do, `python -m serving.server --variant cpu` (the supervisor
   and its tritonserver), on free ports, and waits for the supervisor's /v2/health/ready;
3. sends a 50-request warm-up, then `--requests` requests from `--concurrency` threads, half over
   HTTP and half over gRPC (client.generate), a mix drawn with seed 0: sizes 128 to 256 (squares
   and non-squares), 1 to 8 steps, guidance 1.0 or 1.5 with and without a negative prompt, 1 to 3
   images, and 10% invalid requests (height 100, 0 steps, guidance NaN, no prompt, a 5,000-byte
   prompt) that must get INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT). Every valid response must
   hold images of the requested shape and the seeds seed..seed+n-1; anything else (a refusal at
   capacity included) counts as unexpected;
4. every 2 s samples the resident memory of the whole server process tree (supervisor,
   tritonserver, every Python-backend stub), the /dev/shm bytes of this server's stubs' regions and
   the count of completed requests;
5. checks that the supervisor restarted nothing (its /metrics), stops it with SIGTERM (it must exit
   0 within 120 s) and writes OUT.json (every figure and sample) and OUT.md (the summary), by default
   under $BENCH_RESULTS, else build/results/ (ignored by git); BENCH_RESULTS=benchmarks/results (or
   --out benchmarks/results/soak) refreshes the committed ones.

Growth is the least-squares slope of RSS (and /dev/shm) over completed requests after the warm-up,
in MiB per 1,000 requests.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.measure import bench_parser, process_tree, results_env, save_results, status_kib
from contract.layout import REPO_ROOT
from serving.supervisor import SupervisorProcess

WARMUP = 50
SAMPLE_S = 2.0
SIZES = (128, 192, 256)
MIB = 2**20
INVALID_KINDS = ("height_100", "steps_0", "guidance_nan", "missing_prompt", "oversize_prompt")
INVALID_NAMES = {"height_100": "height", "steps_0": "num_inference_steps", "guidance_nan": "guidance_scale",
                 "missing_prompt": "prompt", "oversize_prompt": "prompt"}
EXPECTED_INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
PROMPTS = (
    "a lighthouse on a cliff at dusk",
    "a photo of a cat",
    "an astronaut riding a horse on the moon, detailed, 35mm film, golden hour",
    "a bowl of ramen",
    "a watercolor painting of a quiet harbour town in the early morning fog, boats resting on still water, "
    "gulls overhead, soft pastel light, the hills behind covered in pines, a church tower, washing lines "
    "between the houses, and a long stone pier reaching out into the sea",  # past 77 tokens: truncated
    "портрет кошки в стиле импрессионизма",
    "東京の夜景、ネオン、雨",
    "a red cube",
)
NEGATIVES = ("blurry, low quality", "text, watermark", "people")


def log(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


# The request mix
@dataclass(frozen=True)
class Request:
    index: int
    protocol: str
    kind: str  # "valid" or one of INVALID_KINDS
    prompt: str | None
    options: dict

    @property
    def expected_images(self) -> int:
        return self.options["num_images_per_prompt"]


def request_mix(count: int, rng: random.Random, start: int = 0) -> list[Request]:
    requests = []
    for index in range(start, start + count):
        protocol = "http" if index % 2 == 0 else "grpc"
        if rng.random() < 0.5:
            height = width = rng.choice(SIZES)
        else:
            height, width = rng.sample(SIZES, 2)
        guidance = rng.choice((1.0, 1.5))
        options = dict(
            seed=rng.randrange(2**32), num_inference_steps=rng.randint(1, 8), guidance_scale=guidance,
            negative_prompt=rng.choice(NEGATIVES) if rng.random() < 0.5 else None,
            height=height, width=width, num_images_per_prompt=rng.randint(1, 3),
        )
        prompt = rng.choice(PROMPTS)
        kind = rng.choice(INVALID_KINDS) if rng.random() < 0.10 else "valid"
        if kind == "height_100":
            options["height"] = 100
        elif kind == "steps_0":
            options["num_inference_steps"] = 0
        elif kind == "guidance_nan":
            options["guidance_scale"] = float("nan")
        elif kind == "missing_prompt":
            prompt = None
        elif kind == "oversize_prompt":
            prompt = ("a very long prompt " * 300)[:5000]
        requests.append(Request(index, protocol, kind, prompt, options))
    return requests


@dataclass
class Outcome:
    index: int
    protocol: str
    kind: str
    outcome: str  # ok, invalid (expected), unexpected
    seconds: float
    images: int = 0
    message: str = ""
    status: str | None = None
    names_input: bool | None = None  # invalid: the message names the bad input


def send(request: Request, urls: dict[str, str]) -> Outcome:
    from client import ClientError, generate

    start = time.perf_counter()
    try:
        result = generate(request.prompt, url=urls[request.protocol], protocol=request.protocol, timeout_s=300,
                          **request.options)
    except ClientError as error:
        seconds = time.perf_counter() - start
        message = str(error)
        if request.kind != "valid" and error.status == EXPECTED_INVALID[request.protocol]:
            return Outcome(request.index, request.protocol, request.kind, "invalid", seconds, message=message,
                           status=error.status, names_input=f"{INVALID_NAMES[request.kind]}:" in message)
        return Outcome(request.index, request.protocol, request.kind, "unexpected", seconds,
                       message=f"{error.status}: {message}", status=error.status)
    except Exception as error:  # noqa: BLE001 - anything else is a finding, not a crash of the soak
        return Outcome(request.index, request.protocol, request.kind, "unexpected", time.perf_counter() - start,
                       message=f"{type(error).__name__}: {error}")
    seconds = time.perf_counter() - start
    if request.kind != "valid":
        return Outcome(request.index, request.protocol, request.kind, "unexpected", seconds,
                       message=f"invalid request ({request.kind}) answered with images {result.images.shape}")
    o = request.options
    n, shape = o["num_images_per_prompt"], (o["num_images_per_prompt"], o["height"], o["width"], 3)
    problems = []
    if result.images.shape != shape or str(result.images.dtype) != "uint8":
        problems.append(f"images {result.images.dtype} {result.images.shape}, expected uint8 {shape}")
    if result.seeds != [o["seed"] + i for i in range(n)]:
        problems.append(f"seeds {result.seeds}, expected {o['seed']}..{o['seed'] + n - 1}")
    if problems:
        return Outcome(request.index, request.protocol, request.kind, "unexpected", seconds, n, "; ".join(problems))
    return Outcome(request.index, request.protocol, request.kind, "ok", seconds, n)


# Sampling
@dataclass
class Sample:
    t: float  # s since the start of the load
    completed: int
    rss: int  # bytes, whole tree
    shm: int  # bytes, this server's stub regions
    anon: int  # bytes, RssAnon summed over the tree (private memory: VmRSS also counts shared pages once per process)
    processes: int
    components: dict = field(default_factory=dict)  # name -> RSS bytes

    def as_dict(self) -> dict:
        return {"t_s": round(self.t, 1), "completed": self.completed, "rss_mib": round(self.rss / MIB, 1),
                "shm_mib": round(self.shm / MIB, 1), "rss_anon_mib": round(self.anon / MIB, 1),
                "processes": self.processes,
                "components_mib": {k: round(v / MIB, 1) for k, v in sorted(self.components.items())}}


def take_sample(supervised: SupervisorProcess, t0: float, completed: int) -> Sample:
    from serving.processes import region_sizes, stubs_of

    triton = supervised.server_pid()
    stubs = stubs_of(triton) if triton else []
    names = {supervised.process.pid: "supervisor", **({triton: "tritonserver"} if triton else {}),
             **{stub.pid: stub.instance for stub in stubs}}
    components, anon = {}, 0
    tree = process_tree(supervised.process.pid)
    for pid in tree:
        components[names.get(pid, f"other_{pid}")] = status_kib(pid, "VmRSS") * 1024
        anon += status_kib(pid, "RssAnon") * 1024
    shm = sum(region_sizes(stubs).values())
    return Sample(time.monotonic() - t0, completed, sum(components.values()), shm, anon, len(tree), components)


class Sampler:
    def __init__(self, supervised: SupervisorProcess, t0: float, completed):
        self.supervised, self.t0, self.completed = supervised, t0, completed
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(take_sample(self.supervised, self.t0, self.completed()))
            self._stop.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(take_sample(self.supervised, self.t0, self.completed()))


def slope_per_1000(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of bytes over completed requests, in MiB per 1,000 requests."""
    xs = [x for x, _ in points]
    if len(points) < 3 or len(set(xs)) < 2:
        return None
    fit = statistics.linear_regression(xs, [y for _, y in points])
    return fit.slope * 1000 / MIB


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# The run
def run_load(requests: list[Request], urls: dict[str, str], concurrency: int, progress, label: str) -> list[Outcome]:
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(request: Request) -> None:
        outcome = send(request, urls)
        with lock:
            outcomes.append(outcome)
            progress(outcome)

    with ThreadPoolExecutor(concurrency, thread_name_prefix=label) as pool:
        for future in [pool.submit(one, r) for r in requests]:
            future.result()
    return sorted(outcomes, key=lambda o: o.index)


def supervisor_restarts(metrics: str) -> dict[str, float]:
    restarts = {}
    for line in metrics.splitlines():
        if line.startswith("sdxl_supervisor_restarts_total"):
            name, value = line.rsplit(" ", 1)
            restarts[name] = float(value)
    return restarts


def summarize_outcomes(outcomes: list[Outcome], seconds: float) -> dict:
    ok = [o for o in outcomes if o.outcome == "ok"]
    invalid = [o for o in outcomes if o.outcome == "invalid"]
    unexpected = [o for o in outcomes if o.outcome == "unexpected"]
    latencies = [o.seconds * 1000 for o in ok]
    return {
        "requests": len(outcomes), "ok": len(ok), "expected_invalid": len(invalid), "unexpected": len(unexpected),
        "by_protocol": {p: dict(Counter(o.outcome for o in outcomes if o.protocol == p)) for p in ("http", "grpc")},
        "invalid_by_kind": dict(sorted(Counter(o.kind for o in invalid).items())),
        "invalid_messages_naming_the_input": sum(bool(o.names_input) for o in invalid),
        "invalid_message_examples": {kind: next(o.message for o in invalid if o.kind == kind)
                                     for kind in sorted({o.kind for o in invalid})},
        "unexpected_messages": dict(Counter(o.message for o in unexpected).most_common()),
        "unexpected_requests": [o.index for o in unexpected],
        "capacity_refusals": sum("at capacity" in o.message for o in unexpected),
        "images": sum(o.images for o in ok),
        "seconds": round(seconds, 1),
        "requests_per_s": round(len(outcomes) / seconds, 3),
        "images_per_s": round(sum(o.images for o in ok) / seconds, 3),
        "latency_ms_valid": {
            "p50": round(percentile(latencies, 0.50), 1) if latencies else None,
            "p95": round(percentile(latencies, 0.95), 1) if latencies else None,
            "max": round(max(latencies), 1) if latencies else None,
        },
        "latency_ms_invalid_p50": round(percentile([o.seconds * 1000 for o in invalid], 0.5), 1) if invalid else None,
    }


def machine() -> dict:
    meminfo = Path("/proc/meminfo").read_text().split("\n")
    total_kib = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {"nproc": os.cpu_count(), "memory_gib": round(total_kib / 2**20, 1), "machine": platform.machine(),
            "python": platform.python_version(), "git_commit": commit + ("-dirty" if dirty else ""),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("soak", __doc__, "soak")
    parser.add_argument("--requests", type=int, default=2000, help="requests after the warm-up (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = results_env(args.out == parser.get_default("out")) + shlex.join(
        ["python", "-m", "benchmarks.soak", *(argv if argv is not None else sys.argv[1:])])
    started_at = datetime.now(timezone.utc)
    run_start = time.monotonic()
    info = machine()
    log(f"{command}: {args.requests} requests at concurrency {args.concurrency}, after a {WARMUP}-request warm-up; "
        f"{info['nproc']} CPUs, {info['memory_gib']} GiB")

    rng = random.Random(0)
    warmup_requests = request_mix(WARMUP, rng)
    main_requests = request_mix(args.requests, rng, start=WARMUP)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        export_start = time.monotonic()
        repository = export_tiny(tmp)
        export_s = time.monotonic() - export_start
        log(f"exported the tiny pipeline (fp32) to {repository} in {export_s:.0f} s")

        supervised = SupervisorProcess(repository, tmp / "serve.log")
        try:
            ready_s = supervised.wait(ready=True)
            log(f"supervisor {supervised.process.pid} ready in {ready_s:.0f} s "
                f"(tritonserver {supervised.server_pid()}); ports {supervised.ports}")
            result = soak(supervised, warmup_requests, main_requests, args.concurrency)
            result["startup"] = {"export_s": round(export_s, 1), "ready_s": round(ready_s, 1)}
            result["server_command"] = " ".join(shlex.quote(a) for a in supervised.command)
            result["shutdown"] = shut_down(supervised)
        except BaseException:
            log(f"failed; the server's log ends with:\n{supervised.log_tail()}")
            raise
        finally:
            supervised.kill_everything()

    result = {
        "command": command, "date": started_at.isoformat(timespec="seconds"), "machine": info,
        "requests": args.requests, "concurrency": args.concurrency, "warmup_requests": WARMUP,
        "duration_s": round(time.monotonic() - run_start, 1), **result,
    }
    save_results(result, args.out, lambda results, path: path.write_text(markdown(results)), indent=1, show=False)
    log(f"done in {result['duration_s']:.0f} s: {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    s = result["load"]
    passed = (s["unexpected"] == 0 and result["warmup"]["unexpected"] == 0 and not result["restarts_nonzero"]
              and result["shutdown"]["exit_code"] == 0)
    return 0 if passed else 1


def export_tiny(tmp: Path) -> Path:
    from export.onnx_export import export_pipeline
    from export.sources import LoraSpec, Sources, load_pipeline
    from export.tiny import write_tiny

    tiny = tmp / "tiny"
    write_tiny(tiny, seed=0)
    loaded = load_pipeline(Sources(str(tiny), (LoraSpec(str(tiny / "lora")),), str(tiny / "alt_vae")), "fp32")
    repository = tmp / "repository"
    export_pipeline(loaded, repository, "fp32")
    del loaded
    return repository


def soak(supervised: SupervisorProcess, warmup: list[Request], requests: list[Request], concurrency: int) -> dict:
    completed = 0
    state = {"t_load": None, "rate_after_100": None, "last_print": 0.0}
    t0 = time.monotonic()
    sampler = Sampler(supervised, t0, lambda: completed).start()

    def progress(outcome: Outcome) -> None:
        nonlocal completed
        completed += 1
        now = time.monotonic()
        if outcome.outcome == "unexpected":
            log(f"UNEXPECTED request {outcome.index} ({outcome.protocol}, {outcome.kind}): {outcome.message}")
        if state["t_load"] is None:
            return
        done = completed - len(warmup)
        if done == 100:
            rate = 100 / (now - state["t_load"])
            state["rate_after_100"] = rate
            projected = len(requests) / rate
            log(f"rate after the first 100 requests: {rate:.2f} requests/s; {len(requests)} requests projected to take "
                f"{projected / 60:.1f} min" + ("  (WARNING: over 15 min)" if projected > 900 else ""))
        if now - state["last_print"] >= 15 or done == len(requests):
            state["last_print"] = now
            last = sampler.samples[-1] if sampler.samples else None
            memory = f"; RSS {last.rss / MIB:.0f} MiB, /dev/shm {last.shm / MIB:.0f} MiB" if last else ""
            log(f"{done}/{len(requests)} requests in {now - state['t_load']:.0f} s "
                f"({done / (now - state['t_load']):.2f}/s){memory}")

    try:
        log(f"warm-up: {len(warmup)} requests")
        w_start = time.monotonic()
        warm = run_load(warmup, {'http': supervised.http_url, 'grpc': supervised.grpc_url}, concurrency, progress, "warmup")
        warm_s = time.monotonic() - w_start
        start_sample = take_sample(supervised, t0, completed)
        sampler.samples.append(start_sample)
        log(f"warm-up done in {warm_s:.0f} s; start: RSS {start_sample.rss / MIB:.0f} MiB over "
            f"{start_sample.processes} processes, /dev/shm {start_sample.shm / MIB:.0f} MiB")
        state["t_load"] = state["last_print"] = time.monotonic()
        outcomes = run_load(requests, {'http': supervised.http_url, 'grpc': supervised.grpc_url}, concurrency, progress, "load")
        load_s = time.monotonic() - state["t_load"]
    finally:
        sampler.stop()
    end_sample = sampler.samples[-1]
    after = [s for s in sampler.samples if s.completed >= len(warmup)]
    status, metrics = supervised.get("/metrics")
    restarts = supervisor_restarts(metrics)
    stub_failures = [line for line in metrics.splitlines() if line.startswith("sdxl_supervisor_stub_failures_total")]
    log(f"load done in {load_s:.0f} s; end: RSS {end_sample.rss / MIB:.0f} MiB, "
        f"/dev/shm {end_sample.shm / MIB:.0f} MiB; supervisor restarts: {restarts or 'none'}")
    components = sorted(set(start_sample.components) | set(end_sample.components))
    return {
        "warmup": summarize_outcomes(warm, warm_s),
        "load": {**summarize_outcomes(outcomes, load_s),
                 "rate_after_first_100_requests_per_s": _round(state["rate_after_100"], 3)},
        "memory": {
            "sample_interval_s": SAMPLE_S, "samples_after_warmup": len(after),
            "rss_mib": memory_figures(sampler.samples, start_sample, end_sample, after, "rss"),
            "rss_anon_mib": memory_figures(sampler.samples, start_sample, end_sample, after, "anon"),
            "shm_mib": memory_figures(sampler.samples, start_sample, end_sample, after, "shm"),
            "processes": {"start": start_sample.processes, "end": end_sample.processes},
            "components_mib": {name: {moment: round(sample.components.get(name, 0) / MIB, 1)
                                      for moment, sample in (("start", start_sample), ("end", end_sample))}
                               for name in components},
        },
        "supervisor_metrics_status": status,
        "supervisor_restarts": restarts,
        "restarts_nonzero": any(v != 0 for v in restarts.values()) or status != 200,
        "supervisor_stub_failures": stub_failures,
        "samples": [s.as_dict() for s in sampler.samples],
    }


def memory_figures(samples: list[Sample], start: Sample, end: Sample, after: list[Sample], key: str) -> dict:
    """Start (after the warm-up), end, peak (any sample) and growth of one memory figure, in MiB."""
    peak = max(samples, key=lambda s: getattr(s, key))
    return {"start": round(getattr(start, key) / MIB, 1), "end": round(getattr(end, key) / MIB, 1),
            "peak": round(getattr(peak, key) / MIB, 1), "peak_at_completed": peak.completed,
            "growth_mib_per_1000_requests": _round(slope_per_1000([(s.completed, getattr(s, key)) for s in after]))}


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def shut_down(supervised: SupervisorProcess) -> dict:
    """SIGTERM the supervisor: it must drain and exit 0 within 120 s, taking tritonserver and its
    stubs (and their /dev/shm regions) with it."""
    from serving.processes import stubs_of

    triton = supervised.server_pid()
    regions = [stub.region for stub in stubs_of(triton)] if triton else []
    start = time.monotonic()
    supervised.process.send_signal(signal.SIGTERM)
    try:
        code = supervised.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - start
    group_left = False
    if triton:
        try:
            os.killpg(triton, 0)
            group_left = True
        except ProcessLookupError:
            pass
    left_regions = [r for r in regions if (Path("/dev/shm") / r).exists()]
    log(f"SIGTERM: supervisor exit code {code} after {seconds:.1f} s; tritonserver group left: {group_left}; "
        f"stub regions left in /dev/shm: {len(left_regions)}")
    tail = supervised.log_tail(8)
    return {"exit_code": code, "seconds": round(seconds, 1), "within_120_s": code is not None,
            "tritonserver_group_left": group_left, "shm_regions_left": left_regions, "supervisor_log_tail": tail}


def markdown(r: dict) -> str:
    s, w, m, sd = r["load"], r["warmup"], r["memory"], r["shutdown"]
    info, lat = r["machine"], s["latency_ms_valid"]
    unexpected = s["unexpected"] + w["unexpected"]
    verdict = "no unexpected outcome" if unexpected == 0 else f"{unexpected} unexpected outcomes"
    load_average = ", ".join(map(str, info["load_average_at_start"]))
    invalid_kinds = ", ".join(f"{k} {v}" for k, v in s["invalid_by_kind"].items())
    protocols = {p: sum(s["by_protocol"][p].values()) for p in ("http", "grpc")}

    # Derived from the samples alone (so that this table can be rebuilt from OUT.json): the second
    # half's slope, and VmRSS - RssAnon (file-backed and shared pages, which the kernel may drop).
    after = [x for x in r["samples"] if x["completed"] >= r["warmup_requests"]]
    middle = (r["warmup_requests"] + after[-1]["completed"]) / 2 if after else 0
    late = [x for x in after if x["completed"] >= middle]

    def late_slope(key) -> str:
        return _fmt(slope_per_1000([(x["completed"], key(x) * MIB) for x in late]))

    def memory(label: str, figures: dict, key) -> list[str]:
        return [f"| {label}: start / end / peak | {figures['start']:.0f} / {figures['end']:.0f} / "
                f"{figures['peak']:.0f} MiB |",
                f"| {label}: growth | {_fmt(figures['growth_mib_per_1000_requests'])} MiB per 1,000 requests "
                f"(second half of the load: {late_slope(key)}) |"]

    def file_backed(x) -> float:
        return x["rss_mib"] - x["rss_anon_mib"]

    drops = [(b["completed"], a["rss_mib"] - b["rss_mib"], a["rss_anon_mib"] - b["rss_anon_mib"])
             for a, b in zip(after, after[1:]) if a["rss_mib"] - b["rss_mib"] > 100]

    lines = [
        f"# Soak: {r['requests']} mixed requests at concurrency {r['concurrency']}, supervised server, "
        "tiny SDXL, CPU variant",
        "",
        f"Command: `{r['command']}` ({r['date']}, {info['nproc']} CPUs, {info['memory_gib']} GiB, "
        f"{info['machine']}, Python {info['python']}, commit {info['git_commit']}; load average at start "
        f"{load_average}). Duration {r['duration_s'] / 60:.1f} min (export {r['startup']['export_s']:.0f} s, "
        f"server ready in {r['startup']['ready_s']:.0f} s, warm-up {w['seconds']:.0f} s, load {s['seconds']:.0f} s).",
        "",
        "The server ran as users run it: `python -m serving.server --variant cpu` (the supervisor and its "
        "tritonserver) on the tiny pipeline's fp32 graphs with this repository's configs. After a "
        f"{r['warmup_requests']}-request warm-up, {r['concurrency']} client threads sent {r['requests']} "
        "requests through `client.generate`, half over HTTP, half over gRPC, a mix drawn with seed 0: sizes "
        "128, 192, 256 (squares and non-squares), 1 to 8 steps, guidance 1.0 or 1.5 with and without a negative "
        "prompt, 1 to 3 images, and 10% invalid requests (height 100, 0 steps, guidance NaN, no prompt, a "
        "5,000-byte prompt) that must get INVALID_ARG. A valid response must hold uint8 images of the requested "
        f"shape and the seeds seed..seed+n-1. Every {m['sample_interval_s']:.0f} s: the resident memory (VmRSS) "
        f"summed over the server's whole process tree ({m['processes']['end']} processes: supervisor, "
        "tritonserver, every Python-backend stub), the /dev/shm size of this server's stub regions, and the "
        "completed requests. Growth is the least-squares slope over completed requests of the "
        f"{m['samples_after_warmup']} samples after the warm-up. VmRSS counts a shared page (libraries, the "
        "stubs' /dev/shm regions) once in every process that touched it; RssAnon, the private part, is given too.",
        "",
        f"Result: {verdict}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests (after warm-up) | {s['requests']} ({protocols['http']} HTTP, {protocols['grpc']} gRPC) |",
        f"| ok | {s['ok']} ({s['images']} images) |",
        f"| expected INVALID_ARG | {s['expected_invalid']} ({invalid_kinds}); "
        f"message names the input: {s['invalid_messages_naming_the_input']} |",
        f"| unexpected | {s['unexpected']} (capacity refusals {s['capacity_refusals']}) |",
        f"| warm-up | {w['requests']} requests: {w['ok']} ok, {w['expected_invalid']} invalid, "
        f"{w['unexpected']} unexpected |",
        f"| throughput | {s['requests_per_s']:.2f} requests/s, {s['images_per_s']:.2f} images/s |",
        f"| rate after the first 100 requests | {s['rate_after_first_100_requests_per_s']} requests/s |",
        f"| latency of valid requests, p50 / p95 / max | {lat['p50']:.0f} / {lat['p95']:.0f} / {lat['max']:.0f} ms |",
        *memory("RSS of the process tree", m["rss_mib"], lambda x: x["rss_mib"]),
        *memory("private memory (RssAnon) of the tree", m["rss_anon_mib"], lambda x: x["rss_anon_mib"]),
        f"| file-backed and shared pages (VmRSS - RssAnon): start / end | {file_backed(after[0]):.0f} / "
        f"{file_backed(after[-1]):.0f} MiB |" if after else "",
        *memory("/dev/shm of the stubs", m["shm_mib"], lambda x: x["shm_mib"]),
        f"| supervisor restarts (/metrics) | {_restarts(r)} |",
        f"| SIGTERM | exit code {sd['exit_code']} after {sd['seconds']:.1f} s; tritonserver group left: "
        f"{'yes' if sd['tritonserver_group_left'] else 'no'}; stub regions left in /dev/shm: "
        f"{len(sd['shm_regions_left'])} |",
        "",
    ]
    if drops:
        where = ", ".join(f"{fell:.0f} MiB at {completed}" for completed, fell, _ in drops)
        lines += [f"VmRSS fell by {sum(d[1] for d in drops):.0f} MiB in {len(drops)} sample interval(s) "
                  f"({where} completed requests) while RssAnon changed by {0.0 - sum(d[2] for d in drops):+.1f} MiB: "
                  "resident file-backed or shared pages were dropped (reclaimed by the kernel, e.g. under memory "
                  "pressure from other work on the machine), not memory the server freed. The VmRSS slope over the "
                  "whole load includes that fall; the private-memory slope does not.", ""]
    if unexpected:
        lines += ["Unexpected outcomes (message: count):", ""]
        for phase in (w, s):
            lines += [f"- `{message}`: {count}" for message, count in phase["unexpected_messages"].items()]
        lines.append("")
    lines += ["Examples of the INVALID_ARG messages:", ""]
    lines += [f"- {kind}: `{message}`" for kind, message in s["invalid_message_examples"].items()]
    lines += ["", "RSS per process, start → end (MiB):", "", "| process | start | end |", "|---|---|---|"]
    lines += [f"| {name} | {v['start']:.0f} | {v['end']:.0f} |" for name, v in m["components_mib"].items()]
    lines += ["", "Every sample is in `soak.json` (`samples`).", ""]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def _restarts(r: dict) -> str:
    if r["supervisor_metrics_status"] != 200:
        return f"/metrics answered {r['supervisor_metrics_status']}"
    if not r["supervisor_restarts"]:
        return "none (no sdxl_supervisor_restarts_total line)"
    return ", ".join(f"`{k}` {v:g}" for k, v in r["supervisor_restarts"].items())


if __name__ == "__main__":
    raise SystemExit(main())
