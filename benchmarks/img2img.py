"""What img2img and inpainting cost in memory and time on this machine, at the largest accepted size.

    python -m benchmarks.img2img [--sizes 512 1024 1536] [--skip-full-size] [--out build/results/img2img_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results (or --out benchmarks/results/img2img_cpu) refreshes the committed ones.

1. `full-size`: SDXL's VAE architecture (the fp16-fix VAE's config, random weights: no hub here)
   exported in fp32 (the CPU variant's dtype) as `vae_encoder` and `vae_decoder`; each graph run once
   by ONNX Runtime at each size, batch 1, in its own process: wall time and the process's peak
   resident memory (the kernel's high-water mark), with ONNX Runtime's memory arena off (its least
   memory) and, at the largest size, on beside it (ONNX Runtime's default). The CPU configs follow
   these rows: the encoder keeps the arena (off saved 1.1 GiB and took 2.2x the time), the decoder
   turns it off (off saved 8.8 GiB and took 1.2x the time). The graphs' attention runs in 16
   query slices (export/modules.py ChunkedSelfAttention).
2. `served`: the tiny pipeline on a real tritonserver (CPU variant, fp32, the repository's configs):
   one request of each kind at the CPU variant's largest size (max_size, 1536x1536) with the most
   images (max_images, 4), 2 steps: text-to-image, img2img, inpainting; per request its time and the
   server's process tree's peak resident memory (sampled every 0.1 s) against the idle server's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import bench_parser, existing_results, Sampler, save_run, started_server, tree_rss_bytes
from .throughput import log, prepare_repository, tiny_pipeline

SIZES = (512, 1024, 1536)
SERVED_SIZE, SERVED_IMAGES, SERVED_STEPS = 1536, 4, 2

# One graph run in a fresh process: its ru_maxrss is that run's peak alone.
_RUN_ONE = """
import json, resource, sys, time
import numpy as np, onnxruntime as ort
path, size, arena = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on"
options = ort.SessionOptions()
options.enable_cpu_mem_arena = arena
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
given = session.get_inputs()[0]
rng = np.random.default_rng(0)
if given.type == "tensor(uint8)":
    feed = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
else:
    feed = rng.standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
start = time.perf_counter()
session.run(None, {given.name: feed})
print(json.dumps({"seconds": round(time.perf_counter() - start, 2),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""


def export_full_size_vae(work: Path) -> dict[str, Path]:
    """vae_encoder and vae_decoder of SDXL's VAE architecture (fp16-fix config), fp32, random weights."""
    from contract.networks import SDXL_DIMS, VAE_DECODER, VAE_ENCODER
    from export.modules import VaeDecoder, VaeEncoder
    from export.onnx_export import export_network
    from export.sdxl import build_component

    vae = build_component("alt_vae").eval()
    paths = {}
    for spec, module in ((VAE_ENCODER, VaeEncoder(vae)), (VAE_DECODER, VaeDecoder(vae))):
        paths[spec.name] = export_network(module.eval(), spec, SDXL_DIMS, "fp32", work / spec.name)
    return paths


def full_size(work: Path, sizes: tuple[int, ...]) -> list[dict]:
    rows = []
    for network, path in export_full_size_vae(work).items():
        for size in sizes:
            for arena in ("off", "on") if size == max(sizes) else ("off",):  # the least memory; the default beside it at the largest
                log(f"{network} {size}x{size}, arena {arena} ...")
                done = subprocess.run([sys.executable, "-c", _RUN_ONE, str(path), str(size), arena], capture_output=True, text=True)
                if done.returncode != 0:
                    rows.append({"network": network, "size": size, "arena": arena, "error": done.stderr.strip()[-300:]})
                    continue
                rows.append({"network": network, "size": size, "arena": arena, **json.loads(done.stdout.strip().splitlines()[-1])})
                log(f"  {rows[-1]}")
    return rows


def served(work: Path) -> dict:
    import numpy as np

    from client import generate

    repository = prepare_repository(work, batching=True, schedulers=4, tiny=tiny_pipeline(work))
    with started_server(repository, work / "tritonserver.log") as server:
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (SERVED_SIZE, SERVED_SIZE, 3), dtype=np.uint8)
        mask = np.zeros((SERVED_SIZE, SERVED_SIZE), np.uint8)
        mask[SERVED_SIZE // 4:-SERVED_SIZE // 4, SERVED_SIZE // 4:-SERVED_SIZE // 4] = 255
        kinds = {"text-to-image": dict(height=SERVED_SIZE, width=SERVED_SIZE), "img2img": dict(image=image, strength=1.0),
                 "inpainting": dict(image=image, mask=mask, strength=1.0)}
        time.sleep(2)
        idle = tree_rss_bytes(server.process.pid)
        rows = {}
        for kind, extra in kinds.items():
            with Sampler(server.process.pid, interval=0.1) as sampler:
                start = time.perf_counter()
                result = generate("a harbour at dusk", url=server.grpc_url, protocol="grpc", seed=1,
                                  num_inference_steps=SERVED_STEPS, num_images_per_prompt=SERVED_IMAGES, **extra)
                seconds = time.perf_counter() - start
            rows[kind] = {"seconds": round(seconds, 2), "peak_gib": round(sampler.peak() / 2**30, 2),
                          "images": list(result.images.shape)}
            log(f"{kind}: {rows[kind]}")
        return {"idle_gib": round(idle / 2**30, 2), "requests": rows}


def write_table(results: dict, path: Path) -> None:
    lines = ["# img2img and inpainting: memory and time at the largest size", "",
             f"`{results['command']}`, {results['machine']}, {results['minutes']:.1f} min. See benchmarks/img2img.py.", ""]
    if results.get("full_size"):
        lines += ["## SDXL's VAE graphs at full size (fp32, ONNX Runtime, batch 1, one process per run)", "",
                  "Random weights of the fp16-fix VAE's architecture. Peak: the process's resident high-water mark "
                  "(session and weights included, about 0.4 GiB). The CPU configs keep the arena on for the "
                  "encoder and turn it off for the decoder.", ""]
        if kept := results.get("full_size_from"):
            lines += [f"These rows are kept from an earlier run: `{kept['command']}`, {kept['minutes']:.1f} min.", ""]
        lines += ["| graph | size | arena | seconds | peak GiB |", "|---|---|---|---|---|"]
        for row in results["full_size"]:
            shown = row.get("error") or f"{row['seconds']} | {row['peak_rss_gib']}"
            lines.append(f"| {row['network']} | {row['size']}x{row['size']} | {row['arena']} | {shown} |")
        lines.append("")
    if results.get("served"):
        served_ = results["served"]
        lines += [f"## Served, tiny model, {SERVED_SIZE}x{SERVED_SIZE}, {SERVED_IMAGES} images, {SERVED_STEPS} steps",
                  "", f"The server's process tree at rest: {served_['idle_gib']} GiB. The requests run in this order, one "
                  "at a time; the first pays ONNX Runtime's first run at this size.", "",
                  "| request | seconds | server peak GiB | images |", "|---|---|---|---|"]
        for kind, row in served_["requests"].items():
            lines.append(f"| {kind} | {row['seconds']} | {row['peak_gib']} | {row['images']} |")
        lines.append("")
    path.write_text("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("img2img", __doc__, "img2img_cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="full-size VAE run sizes (default 512 1024 1536)")
    parser.add_argument("--skip-full-size", action="store_true", help="only the served measure (minutes less); the "
                        "full-size rows are kept from OUT.json, else from the committed results")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-img2img-") as tmp:
        work = Path(tmp)
        results["served"] = served(work)
        if not args.skip_full_size:
            results["full_size"] = full_size(work, tuple(args.sizes))
        elif previous := existing_results(args.out.with_suffix(".json"), log):  # kept from the last full run
            results["full_size"] = previous.get("full_size", [])
            results["full_size_from"] = previous.get("full_size_from") or {key: previous[key] for key in ("command", "minutes")}
    save_run("img2img", argv, started, args, parser, results, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
