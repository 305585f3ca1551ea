"""The streaming endpoint's costs, same run, same machine: time to the first preview, what a preview
costs per step, what streaming costs over `ensemble_sdxl`, and how fast a cancelled stream frees its
batch slot.

    python -m benchmarks.streaming [--sizes 256 512 1024] [--repeats 20] [--out build/results/stream_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results (or --out benchmarks/results/stream_cpu) refreshes the committed ones.

The tiny pipeline, CPU variant, a real tritonserver with the repository's configs; one request at a
time (gRPC), `--repeats` of each, medians reported:
- `ensemble`: ensemble_sdxl, the non-streaming endpoint (4 steps, no CFG, one image);
- `stream k=0`: sdxl_stream with progress responses only; `stream k=1`: a preview after every step;
- preview cost per step: (k=1 total - k=0 total) / the previews sent (steps - 1);
- cancel: an 8-step request cancelled by the client (the stream closed) after its first response;
  client side, from the close to the denoiser counting the cancellation (its batch slot is free;
  /metrics polled every 5 ms), and server side, the stream's own sdxl_stream_cancel_to_free_seconds
  (from the stream seeing the cancellation to the denoiser dropping the request); a request whose
  steps all ran before its cancellation arrived is counted apart ("finished before the cancel"),
  not timed. A step's time
  (the median gap between progress responses) is given beside them: a cancellation is seen at the
  next response, so it costs up to one step, plus the step the engine may be running.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from .measure import bench_parser, save_run, started_server
from .throughput import log, prepare_repository, tiny_pipeline

STEPS = 4
CANCEL_STEPS = 8


def metric(metrics_url: str, name: str) -> float:
    with urllib.request.urlopen(metrics_url) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def ensemble_seconds(url: str, size: int, seed: int) -> float:
    from client import generate

    start = time.perf_counter()
    generate("a lighthouse at dusk", url=url, protocol="grpc", seed=seed, height=size, width=size, num_inference_steps=STEPS)
    return time.perf_counter() - start


def stream_run(url: str, size: int, seed: int, preview_every: int) -> dict[str, float]:
    """Total seconds, the first response's and the first preview's, and the gaps between responses."""
    from client import generate

    updates = list(generate("a lighthouse at dusk", url=url, protocol="grpc", stream=True, seed=seed, height=size,
                            width=size, num_inference_steps=STEPS, preview_every=preview_every))
    times = [u.seconds for u in updates]
    previews = [u.seconds for u in updates if u.images is not None and not u.final]
    return {"total": times[-1], "first_response": times[0], "first_preview": previews[0] if previews else None,
            "gaps": [b - a for a, b in zip(times, times[1:])]}


def cancel_run(url: str, metrics_url: str, size: int, seed: int) -> float | None:
    """Seconds from closing the stream (after its first response) to the denoiser's cancellation;
    None when the request finished before the cancellation reached it (short steps)."""
    from client import generate

    cancelled = metric(metrics_url, "sdxl_engine_cancellations_total")
    completed = metric(metrics_url, "sdxl_stream_request_seconds_count")
    updates = generate("a lighthouse at dusk", url=url, protocol="grpc", stream=True, seed=seed, height=size, width=size,
                       num_inference_steps=CANCEL_STEPS)
    next(updates)
    updates.close()
    closed = time.perf_counter()
    freed = None
    while freed is None and metric(metrics_url, "sdxl_stream_request_seconds_count") == completed:
        if time.perf_counter() - closed > 60:
            raise RuntimeError("the denoiser neither dropped nor finished the cancelled request within 60 s")
        if metric(metrics_url, "sdxl_engine_cancellations_total") != cancelled:
            freed = time.perf_counter() - closed
        time.sleep(0.005)
    deadline = time.perf_counter() + 30  # the stream's instance frees too, before the next run
    while metric(metrics_url, "sdxl_stream_requests_in_flight") and time.perf_counter() < deadline:
        time.sleep(0.01)
    return freed


def median(values) -> float:
    return statistics.median(values)


def measure(repository: Path, sizes: list[int], repeats: int, work: Path) -> list[dict]:
    rows = []
    log("starting tritonserver ...")
    with started_server(repository, work / "tritonserver.log") as server:
        url, metrics_url = server.grpc_url, f"http://127.0.0.1:{server.metrics_port}/metrics"
        for size in sizes:
            for seed in range(2):  # the first calls of each model pay for lazy initialization
                ensemble_seconds(url, size, seed)
                stream_run(url, size, seed, 1)
            ensemble, plain, previews = [], [], []
            for seed in range(repeats):  # interleaved: drift in the machine's speed hits all alike
                ensemble.append(ensemble_seconds(url, size, seed))
                plain.append(stream_run(url, size, seed, 0))
                previews.append(stream_run(url, size, seed, 1))
            server_side_before = (metric(metrics_url, "sdxl_stream_cancel_to_free_seconds_sum"),
                                  metric(metrics_url, "sdxl_stream_cancel_to_free_seconds_count"))
            outcomes = [cancel_run(url, metrics_url, size, seed) for seed in range(repeats)]
            cancels = [seconds for seconds in outcomes if seconds is not None]
            if not cancels:
                raise RuntimeError(f"{size}²: every request finished before its cancellation arrived; use a larger size")
            server_side = ((metric(metrics_url, "sdxl_stream_cancel_to_free_seconds_sum") - server_side_before[0])
                           / max(1, metric(metrics_url, "sdxl_stream_cancel_to_free_seconds_count") - server_side_before[1]))
            row = {
                "size": size, "steps": STEPS, "repeats": repeats,
                "ensemble_ms": 1000 * median(ensemble),
                "stream_k0_ms": 1000 * median(r["total"] for r in plain),
                "stream_k1_ms": 1000 * median(r["total"] for r in previews),
                "first_response_ms": 1000 * median(r["first_response"] for r in plain),
                "first_preview_ms": 1000 * median(r["first_preview"] for r in previews),
                "step_ms": 1000 * median(gap for r in plain for gap in r["gaps"][:-1]),  # the last gap holds the VAE decode
                "cancel_to_free_ms": 1000 * median(cancels), "cancel_to_free_max_ms": 1000 * max(cancels),
                "cancelled": len(cancels), "finished_first": len(outcomes) - len(cancels),
                "server_cancel_to_free_ms": 1000 * server_side,
            }
            row["preview_cost_per_step_ms"] = (row["stream_k1_ms"] - row["stream_k0_ms"]) / (STEPS - 1)
            row["stream_overhead"] = row["stream_k0_ms"] / row["ensemble_ms"]
            rows.append(row)
            log(f"{size}²: ensemble {row['ensemble_ms']:.0f} ms, stream k=0 {row['stream_k0_ms']:.0f} ms, k=1 "
                f"{row['stream_k1_ms']:.0f} ms; first preview {row['first_preview_ms']:.0f} ms; preview "
                f"{row['preview_cost_per_step_ms']:.1f} ms per step; step {row['step_ms']:.0f} ms; cancel to free "
                f"{row['cancel_to_free_ms']:.0f} ms (max {row['cancel_to_free_max_ms']:.0f}; {row['finished_first']} of "
                f"{repeats} finished before their cancellation)")
    return rows


def write_table(results: dict, path: Path) -> None:
    lines = [
        "# Streaming (sdxl_stream): previews, cost, cancellation", "",
        f"`{results['command']}`, {results['machine']}, {results['minutes']:.1f} min. The tiny pipeline, CPU variant, "
        f"one request at a time over gRPC, medians of {results['rows'][0]['repeats']} runs; {STEPS} steps, no CFG, "
        f"one image (cancellation: {CANCEL_STEPS} steps, closed after the first response). See benchmarks/streaming.py.", "",
        "| size | ensemble_sdxl | stream, progress only | stream, preview every step | streaming / ensemble | first response "
        "| first preview | preview cost per step | one step | cancel to slot free (client; max) | server side | finished before the cancel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['size']}² | {r['ensemble_ms']:.0f} ms | {r['stream_k0_ms']:.0f} ms | {r['stream_k1_ms']:.0f} ms "
                     f"| {r['stream_overhead']:.2f}x | {r['first_response_ms']:.0f} ms | {r['first_preview_ms']:.0f} ms "
                     f"| {r['preview_cost_per_step_ms']:.1f} ms | {r['step_ms']:.0f} ms | {r['cancel_to_free_ms']:.0f} ms; "
                     f"{r['cancel_to_free_max_ms']:.0f} ms | {r['server_cancel_to_free_ms']:.0f} ms "
                     f"| {r.get('finished_first', 0)} of {r['repeats']} |")
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("streaming", __doc__, "stream_cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=20)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        work = Path(tmp)
        repository = prepare_repository(work, batching=True, schedulers=4, tiny=tiny_pipeline(work))
        rows = measure(repository, args.sizes, args.repeats, work)
    save_run("streaming", argv, started, args, parser, {"rows": rows}, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
