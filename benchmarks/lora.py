"""What per-request LoRAs cost (docs/loras.md): the UNet step with LoRA inputs against the same UNet
without them, by rank; and the library: adding a LoRA, a server's first read of it, a cached swap,
and its size.

    python -m benchmarks.lora [--arch tiny|sdxl] [--size 512] [--repeats 5] [--traffic-requests 24]
                              [--out build/results/lora_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results (or --out benchmarks/results/lora_cpu) refreshes the committed ones.

Per network (ONNX Runtime, CPU, fp32, the graphs the export writes, one call at a time, median of
`--repeats` after a warm-up): the UNet at batch 1 (no CFG) and 2 (CFG): `unet` (no LoRA inputs:
what UNet calls without LoRAs run, as before per-request LoRAs), and `unet_lora` at rank 1 of zeros
(rows without LoRAs), 8, 32, 64 (one LoRA) and 256 (four of rank 64 stacked). The cost of the branches depends on the rank alone: every site runs, whatever layers the
LoRA touches. `--arch sdxl` does the same at SDXL's size (random weights of its architecture,
`python -m export random --arch sdxl`, about 7.4 GB on disk and 20 GB of memory at the peak).

Library (tiny only): `lora add` of a random LoRA of the tiny UNet and both text encoders (read
through diffusers, checked, installed), a serving process's first read of it, a cached read, and
stacking + packing one request's tensors (what each request pays).

Served traffic (tiny only): a real tritonserver (CPU variant, default configs) under closed-loop
gRPC clients at concurrency 1, 4 and 8, `--traffic-requests` requests per row: a mixed workload
(8 LoRAs of rank 16, Zipf popularity, 10% of requests without) against single-LoRA traffic
(the most popular LoRA every time) and LoRA-free traffic; images/s, p50/p95, and the UNet samples
per execution (how much Triton's dynamic batcher merged the requests' UNet calls).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np

from .measure import bench_parser, median_seconds, results_path, run_record, save_results, started_server

RANKS = (1, 8, 32, 64, 256)
BATCHES = (1, 2)


def log(message: str) -> None:
    print(f"[bench-lora] {message}", flush=True)


def export_unets(pipe, dims, out: Path) -> dict[str, Path]:
    """Both UNet graphs, as the export writes them: `unet` (no LoRA inputs) and `unet_lora`."""
    from contract.networks import UNET, UNET_LORA
    from export.modules import UNet
    from export.onnx_export import export_network

    return {kind: export_network(UNet(pipe.unet).eval(), spec, dims, "fp32", out / spec.name)
            for kind, spec in (("base", UNET), ("lora", UNET_LORA))}


def unet_rows(graphs: dict[str, Path], dims, size: int, repeats: int, ranks=RANKS) -> list[dict]:
    import onnxruntime as ort

    from contract.networks import UNET, UNET_LORA
    from export.onnx_export import COMPUTE_DTYPES, example_inputs

    latent = size // dims.vae_scale_factor
    rows = []
    for kind in ("base", "lora"):
        session = ort.InferenceSession(str(graphs[kind]), providers=["CPUExecutionProvider"])
        for batch in BATCHES:
            for rank in (None,) if kind == "base" else ranks:
                spec = UNET if kind == "base" else UNET_LORA
                inputs = example_inputs(spec, dims, COMPUTE_DTYPES["fp32"], batch=batch, latent_height=latent,
                                        latent_width=latent, lora_rank=rank or 1)
                feed = {name: value.numpy() for name, value in inputs.items()}
                if rank == 1:
                    feed["lora_down"][:] = 0
                    feed["lora_up"][:] = 0
                seconds = median_seconds(lambda: session.run(None, feed), repeats)
                lora_bytes = sum(feed[n].nbytes for n in ("lora_down", "lora_up") if n in feed)
                rows.append({"graph": kind, "batch": batch, "rank": rank, "seconds": seconds, "lora_input_mb": lora_bytes / 1e6})
                log(f"unet {kind} batch {batch} rank {rank}: {seconds * 1000:.1f} ms, LoRA inputs {lora_bytes / 1e6:.1f} MB")
        del session
        gc.collect()
    base = {row["batch"]: row["seconds"] for row in rows if row["graph"] == "base"}
    for row in rows:
        row["vs_base"] = row["seconds"] / base[row["batch"]]
    return rows


def library_rows(pipe, work: Path, repeats: int) -> dict:
    """lora add, a serving process's first and cached reads, and one request's tensors."""
    import shutil

    from contract import layout, loras
    from contract.loras import LORA_NETWORKS
    from export import lora as library
    from export.modules import TextEncoders, UNet
    from export.tiny import write_style_lora
    from serving.loras import ServingLoras

    repository = work / "repo"
    tables = {"unet": UNet(pipe.unet).lora_sites, "text_encoder": TextEncoders(pipe.text_encoder, pipe.text_encoder_2).lora_sites}
    for network in LORA_NETWORKS:
        loras.sites_path(repository, network).parent.mkdir(parents=True, exist_ok=True)
        loras.sites_path(repository, network).write_text(tables[network].to_json())
    source = write_style_lora(pipe, work / "style", seed=3, rank=8)
    start = time.perf_counter()
    info = library.add(repository, "style", str(source), 64)
    add_seconds = time.perf_counter() - start
    serving = ServingLoras(repository, "fp32", 256)
    start = time.perf_counter()
    held = serving.load([("style", 0.8)])
    first_read = time.perf_counter() - start
    cached = median_seconds(lambda: serving.load([("style", 0.8)]), repeats)
    tensors = median_seconds(lambda: (serving.tensors("unet", held, 2), serving.tensors("text_encoder", held, 2)), repeats)
    row_bytes = sum(value.nbytes for value in serving.tensors("unet", held, 1).values())
    shutil.rmtree(loras.library_dir(repository))
    return {"rank": info.rank, "sites": info.networks, "parameters": info.parameters, "size_bytes": info.size_bytes,
            "add_seconds": add_seconds, "first_read_seconds": first_read, "cached_read_seconds": cached,
            "request_tensors_seconds": tensors, "cached_bytes": held[0][0].nbytes, "unet_row_bytes": row_bytes}


def branch_arithmetic(ranks=RANKS, latent: int = 128) -> dict:
    """What the unfused branches add to one SDXL UNet call at 1024x1024, batch 1, from the shapes
    alone (a meta-device UNet of SDXL's architecture, nothing allocated): floating-point operations
    per rank against the whole UNet's (torch's FlopCounterMode, attention included), and the
    elements of the sites' outputs, which an unfused branch adds to in one more pass each."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from contract.loras import sites_of
    from export.sdxl import UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
    shapes = {}  # site -> (positions, down width, out features, output elements)

    def record(module, args, output, name):
        positions = output.numel() // output.shape[-1 if isinstance(module, torch.nn.Linear) else 1]
        shapes[name] = (positions, module.weight[0].numel(), module.weight.shape[0], output.numel())

    table = sites_of("unet", {"unet": unet})
    handles = [unet.get_submodule(site.name.split(".", 1)[1]).register_forward_hook(
        lambda module, args, output, name=site.name: record(module, args, output, name)) for site in table.sites]
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 4, latent, latent), torch.tensor([500.0]), torch.randn(1, 77, 2048),
             added_cond_kwargs={"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)})
    for handle in handles:
        handle.remove()
    total = counter.get_total_flops()
    return {"sites": len(shapes), "unet_tflop": total / 1e12,
            "site_output_elements": sum(s[3] for s in shapes.values()),
            "branch_flop_share": {r: sum(2 * p * r * (k + out) for p, k, out, _ in shapes.values()) / total for r in ranks}}


# The mixed workload: 8 LoRAs, the i-th named with probability proportional to 1 / (i + 1) (Zipf,
# s = 1: a few popular styles and a long tail), and 10% of requests with none. One rank for all (16,
# a common one), so that mixed against single traffic measures the mixing, not the ranks (what a
# rank costs: the UNet rows above).
TRAFFIC_RANKS = (16,) * 8
TRAFFIC_NONE = 0.10
CONCURRENCIES = (1, 4, 8)


def traffic_names(workload: str, count: int, seed: int = 0) -> list[list[str]]:
    """Each request's lora_names: `mixed` as above, `single` the most popular LoRA every time, `none` none."""
    rng = np.random.default_rng(seed)
    names = [f"style{i}" for i in range(len(TRAFFIC_RANKS))]
    if workload == "single":
        return [[names[0]]] * count
    if workload == "none":
        return [[]] * count
    popularity = 1 / np.arange(1, len(names) + 1)
    picks = rng.choice(len(names), size=count, p=popularity / popularity.sum())
    return [[] if rng.random() < TRAFFIC_NONE else [names[i]] for i in picks]


def traffic_rows(pipe, tiny: Path, work: Path, size: int, steps: int, requests: int, concurrencies=CONCURRENCIES) -> list[dict]:
    """The served endpoint (the tiny pipeline, the CPU variant's default configs: 4 loops, Triton's
    dynamic batcher on the UNet) under closed-loop clients: the mixed workload against single-LoRA
    and LoRA-free traffic, same requests otherwise (prompt, seeds, size, steps)."""
    from concurrent.futures import ThreadPoolExecutor

    from client import generate
    from export import lora as library
    from export.tiny import write_style_lora

    from .throughput import prepare_repository, statistics_snapshot

    repository = prepare_repository(work / "traffic", batching=True, schedulers=4, tiny=tiny)
    for i, rank in enumerate(TRAFFIC_RANKS):
        library.add(repository, f"style{i}", str(write_style_lora(pipe, work / f"style{i}", seed=100 + i, rank=rank)), 64)
    rows = []
    with started_server(repository, work / "traffic.log") as server:
        def send(index_names):
            index, names = index_names
            start = time.perf_counter()
            generate("a lighthouse at dusk", url=server.grpc_url, protocol="grpc", seed=index, height=size, width=size,
                     num_inference_steps=steps, loras=[(name, 1.0) for name in names] or None)
            return time.perf_counter() - start

        for warm in (["style0"], []):  # lazy initialization of each model, and a first LoRA read
            send((0, warm))
        for concurrency in concurrencies:
            count = max(requests, 3 * concurrency)
            for workload in ("none", "single", "mixed"):
                batch = list(enumerate(traffic_names(workload, count, seed=concurrency)))
                before = statistics_snapshot(server)
                start = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    latencies = sorted(pool.map(send, batch))
                wall = time.perf_counter() - start
                after = statistics_snapshot(server)
                samples, executions = (sum(after[m][key] - before[m][key] for m in ("unet", "unet_lora"))
                                       for key in ("inference_count", "execution_count"))
                row = {"workload": workload, "concurrency": concurrency, "requests": count, "images_per_s": count / wall,
                       "p50_ms": 1000 * latencies[len(latencies) // 2],
                       "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
                       "unet_samples_per_execution": samples / max(executions, 1),
                       "unet_lora_share": (after["unet_lora"]["inference_count"] - before["unet_lora"]["inference_count"])
                       / max(samples, 1),
                       "distinct_loras": len({tuple(names) for _, names in batch})}
                rows.append(row)
                log(f"traffic {workload} c={concurrency}: {row['images_per_s']:.2f} images/s, p50 {row['p50_ms']:.0f} ms, "
                    f"p95 {row['p95_ms']:.0f} ms, {row['unet_samples_per_execution']:.2f} UNet samples per execution")
    for row in rows:
        single = next(r for r in rows if r["workload"] == "single" and r["concurrency"] == row["concurrency"])
        row["vs_single"] = row["images_per_s"] / single["images_per_s"]
    return rows


def load(arch: str, work: Path):
    """The pipeline's UNet (LCM-LoRA fused, as the export loads it) and text encoders, and its dims."""
    from export.sources import LoraSpec, Sources, load_pipeline, model_dims

    if arch == "tiny":
        from export.tiny import write_tiny

        write_tiny(work / "model", seed=0)
    else:
        from export.sdxl import write_sdxl

        write_sdxl(work / "model", seed=0)
    model = work / "model"
    sources = Sources(str(model), (LoraSpec(str(model / "lora")),), str(model / "alt_vae"))
    components = ("unet", "text_encoder", "text_encoder_2") if arch == "tiny" else ("unet",)
    return load_pipeline(sources, "fp32", components=components).pipe, model_dims(sources)


def write_table(results: dict, path: Path) -> None:
    lines = [f"# Per-request LoRAs: cost ({results['arch']}, {results['size']}x{results['size']}, ONNX Runtime CPU, fp32)", "",
             f"`{results['command']}` on {results['machine']}, {results['minutes']:.1f} min.", "",
             "`unet` runs the UNet calls in which no request names a LoRA; `unet_lora` (the same weights, LoRA inputs) "
             "those in which any does, a row without LoRAs sending zeros (rank 1 of zeros: a whole batch of such rows).", "",
             "| UNet graph | batch | rank | step (ms) | x `unet` | LoRA inputs (MB) |", "|---|---|---|---|---|---|"]
    for row in results["unet"]:
        rank = "-" if row["rank"] is None else ("1 (zeros: no LoRA)" if row["rank"] == 1 else row["rank"])
        lines.append(f"| {'`unet`' if row['graph'] == 'base' else '`unet_lora`'} | {row['batch']} | {rank} | "
                     f"{row['seconds'] * 1000:.1f} | {row['vs_base']:.3f} | {row['lora_input_mb']:.1f} |")
    traffic = results.get("traffic")
    if traffic:
        setup = results["traffic_setup"]
        lines += ["", f"Served traffic (tiny, {setup['size']}², {setup['steps']} steps, gRPC, closed-loop clients; mixed: "
                  f"8 LoRAs of rank {TRAFFIC_RANKS[0]}, Zipf popularity, {TRAFFIC_NONE:.0%} without; "
                  "single: the most popular LoRA every time; none: no LoRA):", "",
                  "| workload | concurrency | requests | distinct LoRA sets | images/s | x single | p50 (ms) | p95 (ms) | "
                  "UNet samples per execution | share on `unet_lora` |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in traffic:
            lines.append(f"| {row['workload']} | {row['concurrency']} | {row['requests']} | {row['distinct_loras']} | "
                         f"{row['images_per_s']:.2f} | {row['vs_single']:.2f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
                         f"{row['unet_samples_per_execution']:.2f} | {row['unet_lora_share']:.0%} |")
    arithmetic = results.get("branch_arithmetic")
    if arithmetic:
        shares = ", ".join(f"rank {r}: {100 * share:.2f}%" for r, share in arithmetic["branch_flop_share"].items())
        lines += ["", f"SDXL's UNet at 1024x1024, batch 1, from the shapes (`branch_arithmetic`): {arithmetic['unet_tflop']:.2f} TFLOP "
                  f"per call; the branches of its {arithmetic['sites']} sites add {shares} of that; their outputs hold "
                  f"{arithmetic['site_output_elements'] / 1e9:.2f} G elements, which an unfused branch reads and writes once more "
                  f"({arithmetic['site_output_elements'] * 4 / 1e9:.1f} GB per call in fp16)."]
    library = results.get("library")
    if library:
        lines += ["", "| library (tiny, one LoRA of rank 8: UNet + both text encoders) | value |", "|---|---|",
                  f"| sites (per network) | {library['sites']} |",
                  f"| parameters, size on disk | {library['parameters']:,}, {library['size_bytes'] / 1e6:.2f} MB |",
                  f"| `lora add` (read through diffusers, check, install) | {library['add_seconds']:.2f} s |",
                  f"| a serving process's first read | {library['first_read_seconds'] * 1000:.1f} ms |",
                  f"| a cached read (the name looked up again) | {library['cached_read_seconds'] * 1000:.2f} ms |",
                  f"| one request's tensors (stack + pack, UNet and text encoders) | {library['request_tensors_seconds'] * 1000:.2f} ms |",
                  f"| serving form: held in a process's cache | {library['cached_bytes'] / 1e6:.2f} MB |",
                  f"| serving form: sent with each UNet row of each call (rank padded to its bucket) | "
                  f"{library['unet_row_bytes'] / 1e6:.2f} MB |"]
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("lora", __doc__, "lora_cpu", note="; lora_cpu_sdxl with --arch sdxl")
    parser.add_argument("--arch", choices=("tiny", "sdxl"), default="tiny")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--traffic-requests", type=int, default=24,
                        help="requests per workload and concurrency in the served-traffic rows (tiny only; 0: skip them)")
    parser.add_argument("--traffic-size", type=int, default=256, help="image size of the served-traffic rows (default 256)")
    parser.add_argument("--traffic-steps", type=int, default=4)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    default_out = args.out == results_path("lora_cpu")
    out = results_path("lora_cpu_sdxl") if default_out and args.arch == "sdxl" else args.out
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        work = Path(tmp)
        log(f"writing the {args.arch} pipeline")
        pipe, dims = load(args.arch, work)
        tiny = args.arch == "tiny"
        library = library_rows(pipe, work, args.repeats) if tiny else None
        traffic = (traffic_rows(pipe, work / "model", work, args.traffic_size, args.traffic_steps, args.traffic_requests)
                   if tiny and args.traffic_requests else None)
        graphs = export_unets(pipe, dims, work / "graphs")
        del pipe  # the graphs hold what the runs need: at SDXL's size, 10 GB less beside a session
        gc.collect()
        results = {**run_record("benchmarks.lora", argv, started, default_out=default_out), "arch": args.arch,
                   "size": args.size, "unet": unet_rows(graphs, dims, args.size, args.repeats, tuple(args.ranks))}
        if library:
            results["library"] = library
        results["branch_arithmetic"] = branch_arithmetic(tuple(args.ranks))
        if traffic:
            results["traffic"] = traffic
            results["traffic_setup"] = {"size": args.traffic_size, "steps": args.traffic_steps}
    results["minutes"] = (time.time() - started) / 60
    save_results(results, out, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
