"""Continuous batching against the loop design, same run, same machine: ensemble_sdxl under
perf_analyzer at several concurrencies and at a Poisson arrival rate near capacity.

    python -m benchmarks.engine [--sizes 256 512] [--concurrency 1 2 4 8 16] [--out build/results/engine_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results (or --out benchmarks/results/engine_cpu) refreshes the committed ones.

Designs (the tiny pipeline, CPU variant, a real tritonserver):
- `loop`: the scheduler runs each request's loop (4 instances, the default configs); concurrent
  requests' UNet calls merge only when Triton's dynamic batcher finds them queued together.
- `engine`: the scheduler hands each request to the denoiser model (engine: "denoiser"), whose one
  engine steps every admitted request together; the scheduler has 16 instances (one request each in
  flight), so up to 16 requests are in the engine.
Per size and design: images/s, p50/p95 (client side), and UNet samples per execution (Triton's own
unet statistics: inferences / executions). Then the Poisson run (`--request-rate-range` with
`--request-distribution poisson`) at 90% of the loop design's throughput at concurrency 8.
perf_analyzer comes from $PERF_ANALYZER, else ../shared/tools/perf_analyzer when present, else PATH.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import tempfile
import time
from pathlib import Path

from contract.configs import config_files, set_parameters

from .measure import bench_parser, save_run, started_server
from .throughput import (PERF_DATA, admin_header_args, log, per_request, perf_analyzer_binary, prepare_repository,
                         statistics_snapshot, tiny_pipeline)

DESIGNS = {"loop": dict(engine="", schedulers=4), "engine": dict(engine="denoiser", schedulers=16)}


def perf_data(size: int, directory: Path) -> Path:
    """perf/ensemble_sdxl_cpu.json (prompts of four lengths, CFG on half) at `size`x`size`."""
    data = json.loads(PERF_DATA.read_text())
    for entry in data["data"]:
        entry["height"], entry["width"] = [size], [size]
    path = directory / f"ensemble_sdxl_{size}.json"
    path.write_text(json.dumps(data))
    return path


def run_perf(server, data: Path, load: list[str], requests: int, csv_path: Path) -> dict[str, float]:
    command = [perf_analyzer_binary(), "-m", "ensemble_sdxl", "-u", server.grpc_url, "-i", "grpc", *admin_header_args(server),
               "--input-data", str(data), *load,
               "--measurement-mode", "count_windows", "--measurement-request-count", str(requests),
               "--stability-percentage", "50", "--max-trials", "6", "--percentile", "95", "-f", str(csv_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    row = next(csv.DictReader(csv_path.open()))
    return {"throughput": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p95_ms": float(row["p95 latency"]) / 1000}


def prepare(root: Path, design: str, tiny: Path) -> Path:
    settings = DESIGNS[design]
    repository = prepare_repository(root / design, batching=True, schedulers=settings["schedulers"], tiny=tiny)
    for path in config_files(repository, "scheduler"):
        set_parameters(path, {"engine": settings["engine"]})
    return repository


def measure(design: str, repository: Path, sizes: list[int], concurrencies: list[int], work: Path,
            poisson_rates: dict[int, float] | None) -> list[dict]:
    from client import generate

    rows = []
    log(f"{design}: starting tritonserver ...")
    with started_server(repository, work / f"{design}.log") as server:
        for size in sizes:
            data = perf_data(size, work)
            for seed in range(2):  # the first calls of each model pay for lazy initialization
                generate("warm up", url=server.http_url, seed=seed, height=size, width=size)
            loads = [(f"c={c}", c, ["--concurrency-range", str(c)]) for c in concurrencies]
            if poisson_rates:
                rate = poisson_rates[size]
                loads.append((f"poisson {rate:.2f}/s", None, ["--request-rate-range", f"{rate:.3f}",
                                                              "--request-distribution", "poisson"]))
            for label, concurrency, load in loads:
                before = statistics_snapshot(server)
                client = run_perf(server, data, load, max(24, 4 * (concurrency or 4)), work / "perf.csv")
                after = statistics_snapshot(server)
                completed = after["ensemble_sdxl"]["inference_count"] - before["ensemble_sdxl"]["inference_count"]
                figures = per_request(before, after, completed)
                row = {"design": design, "size": size, "load": label, "concurrency": concurrency, **client,
                       "samples_per_execution": figures["unet_inferences"] / max(figures["unet_executions"], 1),
                       "unet_executions": figures["unet_executions"], "unet_samples": figures["unet_inferences"],
                       "requests": completed}
                rows.append(row)
                log(f"{design} {size}² {label}: {row['throughput']:.2f} images/s, p50 {row['p50_ms']:.0f} ms, "
                    f"p95 {row['p95_ms']:.0f} ms, {row['samples_per_execution']:.2f} UNet samples per execution")
    return rows


def write_table(results: dict, path: Path) -> None:
    rows = results["rows"]
    lines = [
        f"# Continuous batching against the loop design ({results['machine']})",
        "",
        f"Command: `{results['command']}`. Tiny SDXL, CPU variant, fp32 graphs; perf/ensemble_sdxl_cpu.json at each size "
        "(one image per request, 4 steps, prompts of four lengths, CFG on half the requests). `loop`: 4 scheduler "
        "instances, each running its request's loop (the default). `engine`: the denoiser's engine steps every request "
        "in flight together; 16 scheduler instances hand it their requests. UNet samples per execution: Triton's unet "
        "statistics, inferences (samples) / executions.",
        "",
        "| size | load | design | images/s | p50 ms | p95 ms | UNet samples per execution |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["size"], r["concurrency"] is None, r["concurrency"] or 0, r["design"])):
        lines.append(f"| {row['size']}² | {row['load']} | {row['design']} | {row['throughput']:.2f} | {row['p50_ms']:.0f} | "
                     f"{row['p95_ms']:.0f} | {row['samples_per_execution']:.2f} |")
    lines += ["", "Against the targets:", ""]
    for line in results["targets"]:
        lines.append(f"- {line}")
    path.write_text("\n".join(lines) + "\n")


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, per size: samples per execution at c=16 at least 2x the loop design's;
    throughput at c=8 at least 1.5x c=1 (engine); p50 at c=1 no more than 5% worse than the loop's."""
    def find(design, size, load):
        return next((r for r in rows if r["design"] == design and r["size"] == size and r["load"] == load), None)

    lines = []
    for size in sorted({r["size"] for r in rows}):
        loop16, engine16 = find("loop", size, "c=16"), find("engine", size, "c=16")
        engine1, engine8, loop1 = find("engine", size, "c=1"), find("engine", size, "c=8"), find("loop", size, "c=1")
        if loop16 and engine16:
            ratio = engine16["samples_per_execution"] / loop16["samples_per_execution"]
            lines.append(f"{size}²: UNet samples per execution at c=16, engine / loop = {engine16['samples_per_execution']:.2f} / "
                         f"{loop16['samples_per_execution']:.2f} = {ratio:.2f}x (target 2x: {'met' if ratio >= 2 else 'missed'})")
        if engine1 and engine8:
            ratio = engine8["throughput"] / engine1["throughput"]
            lines.append(f"{size}²: engine throughput c=8 / c=1 = {ratio:.2f}x (target 1.5x: {'met' if ratio >= 1.5 else 'missed'})")
        if engine1 and loop1:
            ratio = engine1["p50_ms"] / loop1["p50_ms"]
            lines.append(f"{size}²: p50 at c=1, engine / loop = {engine1['p50_ms']:.0f} / {loop1['p50_ms']:.0f} ms = {ratio:.2f} "
                         f"(target at most 1.05: {'met' if ratio <= 1.05 else 'missed'})")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("engine", __doc__, "engine_cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--no-poisson", action="store_true", help="skip the Poisson arrival runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        work = Path(tmp)
        tiny = tiny_pipeline(work)
        loop = prepare(work, "loop", tiny)
        rows = measure("loop", loop, args.sizes, args.concurrency, work, None)
        rates = None
        if not args.no_poisson:
            rates = {size: 0.9 * next(r["throughput"] for r in rows if r["size"] == size and r["concurrency"] == 8)
                     for size in args.sizes if any(r["size"] == size and r["concurrency"] == 8 for r in rows)}
            rows += measure("loop", loop, args.sizes, [], work, rates)
        rows += measure("engine", prepare(work, "engine", tiny), args.sizes, args.concurrency, work, rates)
    save_run("engine", argv, started, args, parser, {"rows": rows, "targets": targets(rows)}, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
