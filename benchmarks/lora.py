"""What per-request LoRAs cost (docs/loras.md): the UNet step with LoRA inputs against the same UNet
without them, by rank; and the library: adding a LoRA, a server's first read of it, a cached swap,
and its size.

    python -m benchmarks.lora [--arch tiny|sdxl] [--size 512] [--repeats 5] [--out build/results/lora_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results (or --out benchmarks/results/lora_cpu) refreshes the committed ones.

Per network (ONNX Runtime, CPU, fp32, the graphs the export writes, one call at a time, median of
`--repeats` after a warm-up): the UNet at batch 1 (no CFG) and 2 (CFG) without LoRA inputs (the
graph of the UNet module alone: what the repository served before per-request LoRAs), and with
them at rank 1 of zeros (a request without LoRAs), 8, 32, 64 (one LoRA) and 256 (four of rank 64
stacked). The cost of the branches depends on the rank alone: every site runs, whatever layers the
LoRA touches. `--arch sdxl` does the same at SDXL's size (random weights of its architecture,
`python -m export random --arch sdxl`, about 7.4 GB on disk and 20 GB of memory at the peak).

Library (tiny only): `lora add` of a random LoRA of the tiny UNet and both text encoders (read
through diffusers, checked, installed), a serving process's first read of it, a cached read, and
stacking + packing one request's tensors (what each request pays).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .measure import out_help, results_path, run_record, save_results

RANKS = (1, 8, 32, 64, 256)
BATCHES = (1, 2)


def log(message: str) -> None:
    print(f"[bench-lora] {message}", flush=True)


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up: ONNX Runtime plans its first run
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def export_unets(pipe, dims, out: Path) -> dict[str, Path]:
    """The UNet graph with LoRA inputs (as the export writes it) and the same UNet module traced
    without them."""
    import torch

    from contract.networks import UNET
    from export.modules import UNet
    from export.onnx_export import COMPUTE_DTYPES, export_network

    with_lora = export_network(UNet(pipe.unet).eval(), UNET, dims, "fp32", out / "with_lora")
    base = UNet(pipe.unet).eval()
    names = UNET.input_names[:5]
    from export.onnx_export import TRACE_SIZES, example_inputs

    args = tuple(example_inputs(UNET, dims, COMPUTE_DTYPES["fp32"], **TRACE_SIZES).values())[:5]
    (out / "base").mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(base, args, str(out / "base" / "model.onnx"), dynamo=False, opset_version=17, input_names=names,
                          output_names=["noise_pred"], dynamic_axes={n: UNET.dynamic_axes()[n] for n in names})
    return {"base": out / "base" / "model.onnx", "lora": with_lora}


def unet_rows(pipe, dims, work: Path, size: int, repeats: int, ranks=RANKS) -> list[dict]:
    import onnxruntime as ort

    from contract.networks import UNET
    from export.onnx_export import COMPUTE_DTYPES, example_inputs

    graphs = export_unets(pipe, dims, work)
    del pipe  # the graphs hold what the runs need
    gc.collect()
    latent = size // dims.vae_scale_factor
    rows = []
    for kind in ("base", "lora"):
        session = ort.InferenceSession(str(graphs[kind]), providers=["CPUExecutionProvider"])
        for batch in BATCHES:
            for rank in (None,) if kind == "base" else ranks:
                inputs = example_inputs(UNET, dims, COMPUTE_DTYPES["fp32"], batch=batch, latent_height=latent,
                                        latent_width=latent, lora_rank=rank or 1)
                feed = {name: value.numpy() for name, value in inputs.items()}
                if kind == "base":
                    feed = {name: feed[name] for name in UNET.input_names[:5]}
                elif rank == 1:
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
        layout.version_dir(repository, network).mkdir(parents=True, exist_ok=True)
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
    shutil.rmtree(loras.library_dir(repository))
    return {"rank": info.rank, "sites": info.networks, "parameters": info.parameters, "size_bytes": info.size_bytes,
            "add_seconds": add_seconds, "first_read_seconds": first_read, "cached_read_seconds": cached,
            "request_tensors_seconds": tensors}


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
             "| UNet graph | batch | rank | step (ms) | x no-LoRA-inputs graph | LoRA inputs (MB) |", "|---|---|---|---|---|---|"]
    for row in results["unet"]:
        rank = "-" if row["rank"] is None else ("1 (zeros: no LoRA)" if row["rank"] == 1 else row["rank"])
        lines.append(f"| {'without LoRA inputs' if row['graph'] == 'base' else 'with LoRA inputs'} | {row['batch']} | {rank} | "
                     f"{row['seconds'] * 1000:.1f} | {row['vs_base']:.3f} | {row['lora_input_mb']:.1f} |")
    library = results.get("library")
    if library:
        lines += ["", "| library (tiny, one LoRA of rank 8: UNet + both text encoders) | value |", "|---|---|",
                  f"| sites (per network) | {library['sites']} |",
                  f"| parameters, size on disk | {library['parameters']:,}, {library['size_bytes'] / 1e6:.2f} MB |",
                  f"| `lora add` (read through diffusers, check, install) | {library['add_seconds']:.2f} s |",
                  f"| a serving process's first read | {library['first_read_seconds'] * 1000:.1f} ms |",
                  f"| a cached read (the name looked up again) | {library['cached_read_seconds'] * 1000:.2f} ms |",
                  f"| one request's tensors (stack + pack, UNet and text encoders) | {library['request_tensors_seconds'] * 1000:.2f} ms |"]
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sdxl"), default="tiny")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--out", type=Path, default=results_path("lora_cpu"),
                        help=out_help("lora_cpu", note="; lora_cpu_sdxl with --arch sdxl"))
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
        library = library_rows(pipe, work, args.repeats) if args.arch == "tiny" else None
        results = {**run_record("benchmarks.lora", argv, started, default_out=default_out), "arch": args.arch,
                   "size": args.size, "unet": unet_rows(pipe, dims, work / "graphs", args.size, args.repeats, tuple(args.ranks))}
        if library:
            results["library"] = library
    results["minutes"] = (time.time() - started) / 60
    save_results(results, out, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
