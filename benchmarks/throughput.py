"""Throughput and latency of ensemble_sdxl under concurrent load, with perf_analyzer, in one run.

    python -m benchmarks.throughput [--concurrency 1 2 4 8 16] [--setups SETUP ...] [--out build/results/throughput_cpu]

What it does, on the tiny pipeline (CPU variant, a real tritonserver):
1. exports the tiny SDXL into a temporary model repository with this repository's configs, in the
   CPU default dtype (fp32) and, for one setup, in fp16;
2. for each serving setup (UNet/text/VAE dynamic batching on with 4 scheduler instances; batching
   off; batching on with 1 scheduler instance) starts the server, runs perf_analyzer at every
   concurrency over perf/ensemble_sdxl_cpu.json (prompts of four lengths, CFG on half of them), and
   reads Triton's statistics around each run: per-model compute time per request and the UNet's
   executions against its inferences (how much dynamic batching merged);
3. runs the same requests in-process with diffusers' StableDiffusionXLPipeline + LCMScheduler on the
   same weights (fp32, what a CPU user would run, and fp16), sequentially: the baseline;
4. writes a JSON of every figure, a Markdown table and a PNG plot: OUT.json, OUT.md and OUT.png, by
   default under $BENCH_RESULTS, else build/results/ (ignored by git); BENCH_RESULTS=benchmarks/results
   (or --out benchmarks/results/throughput_cpu) refreshes the committed ones.
perf_analyzer comes from $PERF_ANALYZER, else ../shared/tools/perf_analyzer when present, else PATH.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.measure import bench_parser, results_env, save_results, started_server
from contract.configs import CPU_DTYPE
from contract.layout import REPO_ROOT

PERF_DATA = REPO_ROOT / "perf" / "ensemble_sdxl_cpu.json"
MODELS = ("tokenizer", "text_encoder", "scheduler", "unet", "vae_decoder", "ensemble_sdxl")
SETUPS = {
    "batching on, 4 schedulers": dict(batching=True, schedulers=4),
    "fp16 graphs, batching on, 4 schedulers": dict(batching=True, schedulers=4, dtype="fp16"),
    "batching off, 4 schedulers": dict(batching=False, schedulers=4),
    "batching on, 1 scheduler": dict(batching=True, schedulers=1),
    "batching on, 4 schedulers, 2 ms UNet queue delay": dict(batching=True, schedulers=4, unet_delay_us=2000),
}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def perf_analyzer_binary() -> str:
    shared = REPO_ROOT.parent / "shared" / "tools" / "perf_analyzer"
    return os.environ.get("PERF_ANALYZER") or (str(shared) if shared.exists() else "perf_analyzer")


def tiny_pipeline(work: Path) -> Path:
    """The tiny random-weight pipeline (seed 0) written under `work`."""
    from export.tiny import write_tiny

    write_tiny(work / "tiny", seed=0)
    return work / "tiny"


def prepare_repository(root: Path, batching: bool, schedulers: int, tiny: Path, unet_delay_us: int | None = None,
                       dtype: str = CPU_DTYPE) -> Path:
    """A model repository of the tiny graphs with this repository's configs (the export sets their
    dtype and widths), adjusted per setup."""
    from export.onnx_export import export_pipeline
    from export.sources import LoraSpec, Sources

    repository = root / dtype / ("batching" if batching else "no-batching") / f"schedulers-{schedulers}-delay-{unet_delay_us}"
    cached = root / f"graphs-{dtype}"
    if not cached.exists():
        export_pipeline(Sources(str(tiny), (LoraSpec(str(tiny / "lora")),), str(tiny / "alt_vae")), cached, dtype)
    shutil.copytree(cached, repository)
    for model in ("text_encoder", "unet", "vae_decoder"):
        path = repository / model / "configs" / "cpu.pbtxt"
        if not batching:
            path.write_text(re.sub(r"^dynamic_batching .*$", "", path.read_text(), flags=re.M))
    if unet_delay_us is not None:
        path = repository / "unet" / "configs" / "cpu.pbtxt"
        path.write_text(re.sub(r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {unet_delay_us}", path.read_text()))
    path = repository / "scheduler" / "configs" / "cpu.pbtxt"
    path.write_text(re.sub(r"count: \d+", f"count: {schedulers}", path.read_text()))
    # Closed-loop clients up to concurrency 16 measure the loops, not admission: nothing is refused.
    path = repository / "tokenizer" / "config.pbtxt"
    path.write_text(re.sub(r'(key: "max_queue_size" value: \{ string_value: ")\d+', r"\g<1>64", path.read_text()))
    return repository


def statistics_snapshot(server) -> dict[str, dict]:
    """Triton's statistics of every model (an admin API: `server` sends its key), by name."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/stats", headers=server.admin_headers())
    with urllib.request.urlopen(request) as response:
        stats = json.load(response)["model_stats"]
    return {s["name"]: s for s in stats}


def per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """Milliseconds of compute_infer per endpoint request, per model; UNet executions/inferences."""
    figures = {}
    for model in MODELS:
        b, a = before[model]["inference_stats"], after[model]["inference_stats"]
        figures[f"{model}_compute_ms"] = (a["compute_infer"]["ns"] - b["compute_infer"]["ns"]) / 1e6 / max(requests, 1)
        figures[f"{model}_queue_ms"] = (a["queue"]["ns"] - b["queue"]["ns"]) / 1e6 / max(requests, 1)
    b, a = before["ensemble_sdxl"]["inference_stats"]["success"], after["ensemble_sdxl"]["inference_stats"]["success"]
    figures["request_ms"] = (a["ns"] - b["ns"]) / 1e6 / max(a["count"] - b["count"], 1)  # server side, end to end
    unet_b, unet_a = before["unet"], after["unet"]
    figures["unet_inferences"] = unet_a["inference_count"] - unet_b["inference_count"]  # samples
    figures["unet_executions"] = unet_a["execution_count"] - unet_b["execution_count"]
    figures["unet_calls"] = (unet_a["inference_stats"]["success"]["count"]  # BLS requests from the scheduler
                             - unet_b["inference_stats"]["success"]["count"])
    return figures


def admin_header_args(server) -> list[str]:
    """perf_analyzer's -H options that send `server`'s admin key (it reads model configs and statistics)."""
    return [arg for name, value in server.admin_headers("grpc").items() for arg in ("-H", f"{name}:{value}")]


def run_perf(binary: str, server, concurrency: int, requests: int, csv_path: Path) -> dict[str, float]:
    """One perf_analyzer run: windows of a fixed request count, stable within 50% (a shared 2-core
    machine is noisy; time windows of a few seconds did not settle)."""
    command = [binary, "-m", "ensemble_sdxl", "-u", server.grpc_url, "-i", "grpc", *admin_header_args(server), "--input-data", str(PERF_DATA),
               "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
               "--measurement-request-count", str(max(requests, 4 * concurrency)), "--stability-percentage", "50",
               "--max-trials", "8", "--percentile", "95", "-f", str(csv_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    row = next(csv.DictReader(csv_path.open()))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p95_ms": float(row["p95 latency"]) / 1000,
    }


def warm_up(http_url: str) -> None:
    """The first calls of each model pay for lazy initialization: keep them out of the figures."""
    from client import generate

    for entry in json.loads(PERF_DATA.read_text())["data"]:
        generate(entry["prompt"][0], url=http_url, negative_prompt=entry["negative_prompt"][0] or None,
                 guidance_scale=entry["guidance_scale"][0], height=entry["height"][0], width=entry["width"][0])


def measure_setup(name: str, repository: Path, concurrencies: list[int], requests: int, work: Path) -> list[dict]:
    rows = []
    log(f"{name}: starting tritonserver ...")
    with started_server(repository, work / f"{repository.parent.name}-{repository.name}.log") as server:
        binary = perf_analyzer_binary()
        warm_up(server.http_url)
        for concurrency in concurrencies:
            before = statistics_snapshot(server)
            client = run_perf(binary, server, concurrency, requests, work / "perf.csv")
            after = statistics_snapshot(server)
            completed = after["ensemble_sdxl"]["inference_count"] - before["ensemble_sdxl"]["inference_count"]
            row = {"setup": name, "concurrency": concurrency, **client, **per_request(before, after, completed), "requests": completed}
            # Network compute: what the GPU engines do in production. Everything else in the request's
            # server-side latency is serving overhead: queueing, Python models, BLS, the ensemble.
            row["network_compute_ms"] = row["text_encoder_compute_ms"] + row["unet_compute_ms"] + row["vae_decoder_compute_ms"]
            row["scheduler_loop_ms"] = row["scheduler_compute_ms"] - row["unet_compute_ms"] - row["unet_queue_ms"]
            row["overhead_fraction"] = max(0.0, 1 - row["network_compute_ms"] / row["request_ms"])
            rows.append(row)
            log(f"{name}, c={concurrency}: {row['throughput']:.2f} images/s, p50 {row['p50_ms']:.0f} ms, "
                f"p95 {row['p95_ms']:.0f} ms, UNet {row['unet_executions']} executions for {row['unet_calls']} calls")
    return rows


def diffusers_baseline(tiny: Path, dtype: str, repeats: int) -> dict:
    """The same requests, in-process, one after another: diffusers as a user would run it."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from export.sources import LoraSpec, Sources, load_pipeline

    loaded = load_pipeline(Sources(str(tiny), (LoraSpec(str(tiny / "lora")),), str(tiny / "alt_vae")), dtype)
    components = {**loaded.pipe.components, "scheduler": LCMScheduler.from_config(loaded.pipe.scheduler.config)}
    pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    entries = json.loads(PERF_DATA.read_text())["data"]
    latencies = []
    with torch.no_grad():
        for i in range(repeats + 1):
            entry = entries[i % len(entries)]
            start = time.perf_counter()
            pipe(entry["prompt"][0], negative_prompt=entry["negative_prompt"][0] or None, guidance_scale=entry["guidance_scale"][0],
                 num_inference_steps=entry["num_inference_steps"][0], height=entry["height"][0], width=entry["width"][0],
                 generator=torch.Generator("cpu").manual_seed(entry["seed"][0]), output_type="np")
            if i:  # the first call pays for lazy initialization
                latencies.append(time.perf_counter() - start)
    latencies.sort()
    return {
        "setup": f"diffusers in-process, {dtype}",
        "throughput": len(latencies) / sum(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
    }


def write_table(results: dict, path: Path) -> None:
    lines = [
        f"# ensemble_sdxl throughput, tiny SDXL, CPU variant ({results['machine']})",
        "",
        f"Command: `{results['command']}`. One image per request, 4 steps, {results['size']}², prompts of four lengths, "
        "CFG (guidance 1.5, a negative prompt) on half the requests (perf/ensemble_sdxl_cpu.json). Graphs in "
        f"{CPU_DTYPE} (the CPU variant's default) unless the setup says fp16.",
        "",
        "Columns: client-side throughput and latency (perf_analyzer); UNet calls per UNet execution (the scheduler "
        "makes one call per request per step; above 1, dynamic batching merged the calls of concurrent requests); per request, server side: the networks' "
        "compute (text encoder + UNet + VAE, what TensorRT does in production), the scheduler's own loop time "
        "(Python, BLS, outside UNet queue and compute), and the share of the server-side latency that is not "
        "network compute (serving overhead, queueing included).",
        "",
        "| setup | concurrency | images/s | p50 ms | p95 ms | UNet calls per execution | network compute ms | scheduler loop ms | server ms | serving overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["served"]:
        lines.append(
            f"| {row['setup']} | {row['concurrency']} | {row['throughput']:.2f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
            f"{row['unet_calls'] / max(row['unet_executions'], 1):.2f} | {row['network_compute_ms']:.0f} | "
            f"{row['scheduler_loop_ms']:.0f} | {row['request_ms']:.0f} | {row['overhead_fraction']:.0%} |"
        )
    for row in results["baseline"]:
        lines.append(f"| {row['setup']} | 1 (sequential) | {row['throughput']:.2f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | | | | | |")
    lines += ["", "Throughput(c=8) / throughput(c=1):", ""]
    for setup, ratio in results["scaling_8_over_1"].items():
        lines.append(f"- {setup}: {ratio:.2f}x")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for setup in SETUPS:
        rows = [r for r in results["served"] if r["setup"] == setup]
        if not rows:
            continue
        x = [r["concurrency"] for r in rows]
        left.plot(x, [r["throughput"] for r in rows], marker="o", label=setup)
        right.plot(x, [r["p95_ms"] for r in rows], marker="o", label=setup)
    for row in results["baseline"]:
        left.axhline(row["throughput"], linestyle="--", color="gray" if "fp32" in row["setup"] else "silver", label=row["setup"])
    for axis, title, label in ((left, "Throughput", "images / s"), (right, "p95 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(label)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    left.legend(fontsize=7)
    figure.suptitle(f"ensemble_sdxl, tiny SDXL, {results['size']}², 4 steps, CPU variant ({results['machine']})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("throughput", __doc__, "throughput_cpu", writes="OUT.json, OUT.md and OUT.png")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=24, help="requests per measurement window (at least 4 x concurrency)")
    parser.add_argument("--baseline-repeats", type=int, default=24)
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from export.tiny import write_tiny

    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as tmp:
        work = Path(tmp)
        tiny = work / "tiny"
        write_tiny(tiny, seed=0)
        served = []
        for name in args.setups:
            repository = prepare_repository(work, tiny=tiny, **SETUPS[name])
            served += measure_setup(name, repository, args.concurrency, args.requests, work)
        baseline = [diffusers_baseline(tiny, dtype, args.baseline_repeats) for dtype in ("fp32", "fp16")]

    def throughput(setup, c):
        return next((r["throughput"] for r in served if r["setup"] == setup and r["concurrency"] == c), None)

    scaling = {s: throughput(s, 8) / throughput(s, 1) for s in args.setups if throughput(s, 8) and throughput(s, 1)}
    results = {
        "command": results_env(args.out == parser.get_default("out")) + shlex.join(
            ["python", "-m", "benchmarks.throughput", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU",
        "size": json.loads(PERF_DATA.read_text())["data"][0]["height"][0],
        "served": served,
        "baseline": baseline,
        "scaling_8_over_1": scaling,
    }
    save_results(results, args.out, write_table, show=False)
    plot(results, args.out.with_suffix(".png"))
    log(f"wrote {args.out.with_suffix('.md')}, .json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
