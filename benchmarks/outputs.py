"""What files instead of raw pixels cost and save: per image, and per request over gRPC and HTTP.

    python -m benchmarks.outputs [--repeats 5] [--requests 5] [--out build/results/outputs_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results refreshes the committed ones.

1. `per_image`: serving/outputs.py's encoders (Pillow: libjpeg-turbo, libwebp, zlib) and SDXL's
   watermark, on one core, at 512x512 and 1024x1024: median seconds of `repeats` runs and bytes, on
   two images: `photo-like` (smooth gradients and discs: closer to what SDXL makes) and `noise` (the
   tiny random model's output, the worst case for every codec). PNG at zlib levels 1 (served) and 6
   (Pillow's default); JPEG and WebP at quality 90 (the default) and 75.
2. `served`: the tiny pipeline on a real tritonserver (CPU variant): one 4-image 1024x1024 request,
   1 step, raw pixels against JPEG (quality 90), over gRPC and HTTP, alternating; the median of
   `requests` round trips each, the response's size, and the `postprocess` step's own time per request (Triton's
   statistics). The tiny model's 1-step images are noise, so the JPEG bytes are its worst case; the
   time saved is the transfer's and the client's decoding of the protocol.
3. `safety_checker`: the safety checker's parts on this machine: the preprocessing (serving/safety.py,
   per image at 512x512 and 1024x1024, one core) and the graph in ONNX Runtime (fp32, the CPU
   variant's) at 1 and 4 images, for the tiny checker and for CompVis's architecture (CLIP ViT-L/14's
   vision tower, random weights: the time does not depend on them), each exported here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .measure import bench_parser, save_run, started_server
from .throughput import log, prepare_repository, statistics_snapshot, tiny_pipeline

SIZES = (512, 1024)
SETTINGS = (("png", "level 1 (served)", {"compress_level": 1}), ("png", "level 6", {"compress_level": 6}),
            ("jpeg", "quality 90 (default)", {"quality": 90}), ("jpeg", "quality 75", {"quality": 75}),
            ("webp", "quality 90 (default)", {"quality": 90}), ("webp", "quality 75", {"quality": 75}))
SERVED_SIZE, SERVED_IMAGES = 1024, 4


def photo_like(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([np.sin(6 * x + 3 * y), np.cos(5 * x - 4 * y), np.sin(7 * (x + y))], -1)
    rng = np.random.default_rng(1)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, 1, 3)
        image[(y - cy) ** 2 + (x - cx) ** 2 < (0.15 * r) ** 2] = rng.uniform(-1, 1, 3)
    image += rng.normal(0, 0.02, image.shape)  # a little sensor-like grain
    return ((np.clip(image, -1, 1) * 0.5 + 0.5) * 255).round().astype(np.uint8)


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def per_image(repeats: int) -> list[dict]:
    import io

    from PIL import Image

    from serving.outputs import PILLOW_FORMATS, Watermarker

    watermarker, rows = Watermarker(), []
    for size in SIZES:
        images = {"photo-like": photo_like(size),
                  "noise": np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)}
        for kind, image in images.items():
            for fmt, setting, options in SETTINGS:
                def encode():
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, PILLOW_FORMATS[fmt], **options)
                    return buffer.getvalue()
                seconds, data = timed(encode, repeats)
                rows.append({"size": size, "image": kind, "format": fmt, "setting": setting,
                             "ms": round(seconds * 1e3, 1), "bytes": len(data), "of_raw": round(len(data) / image.nbytes, 3)})
                log(f"{size} {kind} {fmt} {setting}: {rows[-1]}")
            seconds, _ = timed(lambda: watermarker.apply(image[None]), repeats)
            rows.append({"size": size, "image": kind, "format": "watermark", "setting": "dwtDct", "ms": round(seconds * 1e3, 1),
                         "bytes": None, "of_raw": None})
    return rows


def served(work: Path, requests: int) -> list[dict]:
    from client import generate

    repository = prepare_repository(work, batching=True, schedulers=4, tiny=tiny_pipeline(work))
    rows = []
    with started_server(repository, work / "tritonserver.log") as server:
        for protocol in ("grpc", "http"):
            url = server.grpc_url if protocol == "grpc" else server.http_url

            def ask(fmt):
                return generate("a harbour at dusk", url=url, protocol=protocol, seed=3, num_inference_steps=1,
                                height=SERVED_SIZE, width=SERVED_SIZE, num_images_per_prompt=SERVED_IMAGES,
                                output_format=None if fmt == "raw" else fmt)
            times, steps_ns, sent = {"raw": [], "jpeg": []}, {"raw": 0, "jpeg": 0}, {}
            for fmt in times:
                ask(fmt)  # warm-up: the first request at this size
            for _ in range(requests):  # raw and JPEG alternate, so that drift on the machine hits both alike
                for fmt in times:
                    before = statistics_snapshot(server)["postprocess"]["inference_stats"]
                    start = time.perf_counter()
                    result = ask(fmt)
                    times[fmt].append(time.perf_counter() - start)
                    after = statistics_snapshot(server)["postprocess"]["inference_stats"]
                    # The postprocess step's own time (Triton's statistics: queue, inputs, execute, outputs):
                    # for raw pixels, what the passthrough adds to every request.
                    steps_ns[fmt] += sum(after[key]["ns"] - before[key]["ns"]
                                         for key in ("queue", "compute_input", "compute_infer", "compute_output"))
                    sent[fmt] = result.images.nbytes if fmt == "raw" else sum(map(len, result.encoded_images))
            for fmt in times:
                rows.append({"protocol": protocol, "format": fmt, "seconds": round(statistics.median(times[fmt]), 3),
                             "spread": [round(min(times[fmt]), 3), round(max(times[fmt]), 3)], "response_bytes": sent[fmt],
                             "postprocess_ms": round(steps_ns[fmt] / 1e6 / requests, 1)})
                log(f"served {protocol} {fmt}: {rows[-1]}")
    return rows


def safety_checker(work: Path, repeats: int) -> list[dict]:
    import onnxruntime as ort

    from contract.networks import SAFETY_CHECKER, SDXL_DIMS
    from export.modules import SafetyCheckerGraph
    from export.onnx_export import export_network
    from export.safety_checker import build_safety_checker, image_processor
    from serving.safety import ClipPreprocessor

    preprocess, rows = ClipPreprocessor(image_processor().to_dict(), "CLIPImageProcessor defaults"), []
    for size in SIZES:
        image = photo_like(size)
        seconds, _ = timed(lambda: preprocess(image), repeats)
        rows.append({"part": "preprocessing", "checker": "-", "size": f"{size}x{size}", "images": 1, "ms": round(seconds * 1e3, 1)})
        log(f"safety checker: {rows[-1]}")
    for name, full_size in (("tiny", False), ("CompVis architecture (CLIP ViT-L/14)", True)):
        module = SafetyCheckerGraph(build_safety_checker(full_size=full_size, seed=0)).eval()
        parameters = sum(p.numel() for p in module.parameters())
        graph = export_network(module, SAFETY_CHECKER, SDXL_DIMS, "fp32", work / f"safety_{int(full_size)}")
        del module
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        for images in (1, 4):
            pixels = np.random.default_rng(0).standard_normal((images, 3, 224, 224), dtype=np.float32)
            session.run(None, {"pixel_values": pixels})  # warm-up
            seconds, _ = timed(lambda: session.run(None, {"pixel_values": pixels}), repeats)
            rows.append({"part": "graph (ONNX Runtime, fp32)", "checker": f"{name}, {parameters / 1e6:.1f} M parameters",
                         "size": "224x224", "images": images, "ms": round(seconds * 1e3, 1)})
            log(f"safety checker: {rows[-1]}")
        del session
    return rows


def write_table(results: dict, path: Path) -> None:
    lines = ["# Encoded images: time and bytes", "",
             f"`{results['command']}`, {results['machine']}, {results['minutes']:.1f} min. See benchmarks/outputs.py.", "",
             f"## Per image (one core, median of {results['repeats']})", "",
             "| size | image | format | setting | ms | bytes | of raw |", "|---|---|---|---|---|---|---|"]
    for row in results["per_image"]:
        size = f"{row['bytes']:,}" if row["bytes"] is not None else "-"
        share = f"{row['of_raw']:.1%}" if row["of_raw"] is not None else "-"
        lines.append(f"| {row['size']}x{row['size']} | {row['image']} | {row['format']} | {row['setting']} | {row['ms']} | {size} | {share} |")
    lines += ["", f"## Served: one request of {SERVED_IMAGES} images at {SERVED_SIZE}x{SERVED_SIZE}, 1 step, tiny model "
              f"(median of {results['requests']})", "",
              "| protocol | output | seconds (median) | min to max | response bytes (images) | postprocess step, ms |",
              "|---|---|---|---|---|---|"]
    for row in results["served"]:
        lines.append(f"| {row['protocol']} | {row['format']} | {row['seconds']} | {row['spread'][0]} to {row['spread'][1]} | "
                     f"{row['response_bytes']:,} | {row['postprocess_ms']} |")
    lines += ["", "postprocess step: Triton's statistics for the `postprocess` model per request (queue, "
              "compute_input, compute_infer, compute_output): for raw pixels, what the ensemble's last step "
              "adds to every request; for JPEG, the encoding of the 4 images too."]
    lines += ["", f"## Safety checker (median of {results['repeats']})", "",
              "| part | checker | input | images | ms |", "|---|---|---|---|---|"]
    for row in results.get("safety_checker", []):
        lines.append(f"| {row['part']} | {row['checker']} | {row['size']} | {row['images']} | {row['ms']} |")
    lines.append("")
    path.write_text("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("outputs", __doc__, "outputs_cpu")
    parser.add_argument("--repeats", type=int, default=5, help="runs per encoding measure (median; default 5)")
    parser.add_argument("--requests", type=int, default=8, help="served requests per row, raw and JPEG alternating (median; default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    results = {"repeats": args.repeats, "requests": args.requests, "per_image": per_image(args.repeats)}
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as tmp:
        results["served"] = served(Path(tmp), args.requests)
        results["safety_checker"] = safety_checker(Path(tmp), args.repeats)
    save_run("outputs", argv, started, args, parser, results, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
