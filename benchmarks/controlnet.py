"""What ControlNets cost (docs/controlnet.md): served, per step at full size, counted, and on a GPU.

    python -m benchmarks.controlnet [--size 512] [--requests 8] [--skip-full] [--skeletons DIR]
                                    [--out build/results/controlnet_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results refreshes the committed ones.

1. `served`: the tiny pipeline exported with three ControlNets (the tiny one as `tiny` and as `canny`:
   two models; the tiny ControlNet-Union as `union`), on a real tritonserver (CPU variant, fp32, the
   default configs: the scheduler's loops), closed-loop gRPC clients at concurrency 1 and 4,
   `--requests` requests per client, SIZE², 4 steps: images/s and latency with 0, 1 and 2 ControlNets,
   one mode of the union model (its map sent, or made from the image by the server's depth estimator),
   two modes (one pass a step), and a mixed load (every other request with one).
   In the mixed load, the latency of the requests without ControlNet against the load without any: what
   a plain request pays for sharing the server with ControlNet requests.
2. `flops`: a ControlNet step (SDXL's ControlNet, diffusers/controlnet-canny-sdxl-1.0's architecture),
   a ControlNet-Union step with one and with two modes (xinsir/controlnet-union-sdxl-1.0's architecture)
   and a UNet step at 1024², one row, counted by PyTorch's FlopCounterMode on the meta device.
3. `full` (unless --skip-full): SDXL's ControlNet and ControlNet-Union and the depth estimator (Depth
   Anything V2 Small's architecture) at full size (random weights) exported in fp32 and run by ONNX
   Runtime at 512², batch 1 (the union with two modes; the depth estimator at 518², its processor's size
   for a 512² image), beside the base UNet's step of `make bench-scale` (benchmarks/results/scale_cpu.json);
   export time and peak memory. --skeletons DIR: also the fp16 exports of `controlnet`, `union_controlnet`,
   `unet_control` and `depth_estimator`, kept without their weights in DIR (`--skeletons
   tests/data/sdxl_graphs` refreshes the tests' copies).
4. `estimate`: a ControlNet step on an H100/H200 at 1024², from the counted work at the rate NVIDIA's
   published H100 TensorRT UNet reaches, against StreamDiffusion's measured ratio (a TensorRT ControlNet
   at about 45% of a UNet step, SD-Turbo 512², RTX 5090).
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .measure import bench_parser, closed_loop_clients, counted_tflops, save_run, started_server
from .scale import ort_step_lines
from .throughput import log, tiny_pipeline

STEPS = 4
ENGINE_NETWORKS = ("controlnet", "union_controlnet", "depth_estimator")  # the full-size graphs built and run here
CASES = {"0 ControlNets": 0, "1 ControlNet": 1, "2 ControlNets": 2, "union, 1 mode": "union1",
         "union, 1 mode, depth map made on the server": "depth", "union, 2 modes (one pass)": "union",
         "mixed (every other request 1)": -1}
CONCURRENCIES = (1, 4)
# NVIDIA/Stability's published SDXL + LCM TensorRT figures on an H100 (DESIGN.md): 4 UNet steps, batch 1, 1024².
H100_UNET_4_STEPS_S = 0.1028
STREAMDIFFUSION_CONTROLNET_OVER_UNET = 6.8 / 14.9  # SD-Turbo 512², RTX 5090, TensorRT (livepeer/StreamDiffusion)


def export_repository(work: Path) -> Path:
    from contract.configs import CPU_DTYPE
    from contract.controlnets import ControlNetSource
    from export.onnx_export import export_pipeline
    from export.depth import DEPTH_SUBFOLDER
    from export.sources import LoraSpec, Sources
    from export.tiny import UNION_SUBFOLDER

    tiny = tiny_pipeline(work)
    controlnets = (ControlNetSource("tiny", str(tiny / "controlnet")), ControlNetSource("canny", str(tiny / "controlnet"), "canny"),
                   ControlNetSource("union", str(tiny / UNION_SUBFOLDER)))
    repository = work / "repository"
    export_pipeline(Sources(str(tiny), (LoraSpec(str(tiny / "lora")),), str(tiny / "alt_vae"), controlnets=controlnets,
                            depth_estimator=str(tiny / DEPTH_SUBFOLDER)), repository, CPU_DTYPE)
    return repository


def sample_control(size: int, seed: int):
    """A smooth picture with edges, uint8 [size, size, 3] (what a control map looks like to a ControlNet)."""
    import numpy as np

    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    red = 255 * (0.5 + 0.5 * np.sin(9 * x + rng.uniform(0, 3)))
    blue = np.where(x + y > 0.9, 230.0, 20.0)
    return np.stack([red, 255 * y, blue], axis=-1).round().astype(np.uint8)


def closed_loop(server, size: int, concurrency: int, requests: int, controls_of) -> list[tuple[int, float]]:
    """`concurrency` clients, each sending `requests` requests one after another; (ControlNets, seconds)
    of every request. `controls_of(i)`: the i-th request's controls."""
    from client import generate

    def one(i: int) -> int:
        controls = controls_of(i)
        generate(f"a house {i}", url=server.grpc_url, protocol="grpc", seed=i, num_inference_steps=STEPS,
                 height=size, width=size, controls=controls or None)
        return len(controls)

    results, wall = closed_loop_clients(concurrency, requests, one)
    return results + [(-1, wall)]  # the wall time, last


def graph_steps(repository: Path, size: int, repeats: int = 9) -> list[dict]:
    """Each graph a ControlNet request's step runs, one call in ONNX Runtime (CPU, fp32) at SIZE², batch 1
    and 2 (CFG), median of `repeats` after a warm-up, the graphs taking turns (drift on the machine
    hits them alike): where a served step's time goes."""
    import onnxruntime as ort

    from contract import layout, networks
    from contract.configs import repository_export
    from export.onnx_export import COMPUTE_DTYPES, example_inputs

    dtype, dims = repository_export(repository)
    latent = size // dims.vae_scale_factor
    union = networks.controlnet_model("union", union=True)
    graphs = {"unet": ("unet", networks.UNET, 1), "unet_lora": ("unet_lora", networks.UNET_LORA, 1),
              "unet_control": ("unet_control", networks.UNET_CONTROL, 1),
              "controlnet (controlnet_tiny)": (networks.controlnet_model("tiny"), networks.CONTROLNET, 1),
              "union_controlnet, 1 mode": (union, networks.UNION_CONTROLNET, 1),
              "union_controlnet, 2 modes": (union, networks.UNION_CONTROLNET, 2)}
    sessions = {name: ort.InferenceSession(str(layout.onnx_path(repository, model)), providers=["CPUExecutionProvider"])
                for name, (model, _, _) in graphs.items()}
    rows = []
    for batch in (1, 2):
        feeds, times = {}, {name: [] for name in graphs}
        for name, (_, spec, modes) in graphs.items():
            inputs = example_inputs(spec, dims, COMPUTE_DTYPES[dtype], batch=batch, latent_height=latent, latent_width=latent, lora_rank=1,
                                    control_modes=modes)
            feeds[name] = {key: value.numpy() for key, value in inputs.items()}
            if "control_modes" in feeds[name]:  # every slot a mode
                feeds[name]["control_modes"][:] = range(modes)
            for key in ("lora_down", "lora_up"):  # a request without LoRAs: rank 1 of zeros
                if key in feeds[name]:
                    feeds[name][key][:] = 0
            sessions[name].run(None, feeds[name])  # warm-up
        for _ in range(repeats):
            for name in graphs:
                start = time.perf_counter()
                sessions[name].run(None, feeds[name])
                times[name].append(time.perf_counter() - start)
        for name in graphs:
            megabytes = sum(v.nbytes for k, v in feeds[name].items() if k in ("control_residuals", "controlnet_cond")) / 1e6
            rows.append({"graph": name, "batch": batch, "ms": round(statistics.median(times[name]) * 1e3, 1),
                         "control_inputs_mb": round(megabytes, 2)})
            log(f"graph step: {rows[-1]}")
    return rows


def served(work: Path, size: int, requests: int) -> tuple[list[dict], list[dict]]:
    from client import Control

    repository = export_repository(work)
    steps = graph_steps(repository, size)
    maps = [sample_control(size, seed) for seed in (1, 2)]
    stacks = {0: [], 1: [Control("tiny", maps[0])], 2: [Control("tiny", maps[0], scale=0.8), Control("canny", maps[1], scale=0.6)],
              "union": [Control("union/depth", maps[0], scale=0.8), Control("union/canny", maps[1], scale=0.6)],
              "union1": [Control("union/depth", maps[0], scale=0.8)], "depth": [Control("union/depth", maps[0], 0.8, preprocess=True)]}
    rows = []
    with started_server(repository, work / "tritonserver.log") as server:
        closed_loop(server, size, 1, 1, lambda i: stacks[2] + stacks["depth"])  # warm-up: every graph's first run at this size
        for case, count in CASES.items():
            for concurrency in CONCURRENCIES:
                def controls_of(i, count=count):
                    return stacks[(i % 2) if count == -1 else count]
                results = closed_loop(server, size, concurrency, requests, controls_of)
                wall = results.pop()[1]
                latencies = [seconds for _, seconds in results]
                plain = [seconds for n, seconds in results if n == 0]
                row = {"case": case, "concurrency": concurrency, "requests": len(results),
                       "images_per_s": round(len(results) / wall, 3), "p50_s": round(statistics.median(latencies), 3),
                       "p95_s": round(sorted(latencies)[max(0, round(0.95 * len(latencies)) - 1)], 3),
                       "plain_p50_s": round(statistics.median(plain), 3) if plain else None}
                rows.append(row)
                log(f"served: {row}")
    return rows, steps


def sdxl_controlnet(unet, union: bool = False):
    """SDXL's ControlNet for `unet` (its down path, the published conditioning embedding), random init;
    `union`: the ControlNet-Union (xinsir/controlnet-union-sdxl-1.0's config: from_unet's defaults)."""
    from diffusers import ControlNetModel, ControlNetUnionModel

    return (ControlNetUnionModel if union else ControlNetModel).from_unet(unet, load_weights_from_unet=False).eval()


def union_inputs(modes: int, image):
    """A union ControlNet's own inputs for one row of `modes` modes (meta or real tensors as `image`)."""
    import torch

    return (image[:, None].expand(1, modes, -1, -1, -1), torch.arange(modes)[None], torch.ones(1, modes), torch.zeros(1, dtype=torch.int64))


def flops() -> dict[str, float]:
    """TFLOP per step at 1024², one row: SDXL's UNet, its ControlNet and its ControlNet-Union with 1 and 2
    modes (meta device: no weights)."""
    import torch

    from contract.networks import SDXL_DIMS, TIME_IDS_DIM
    from export.modules import ControlNet, UNet, UnionControlNet
    from export.sdxl import build_component

    unet = build_component("unet", device="meta")
    with torch.device("meta"):
        controlnet, union = sdxl_controlnet(unet), sdxl_controlnet(unet, union=True)
        inputs = (torch.randn(1, 4, 128, 128), torch.tensor([500.0]), torch.randn(1, SDXL_DIMS.seq_len, SDXL_DIMS.text_dim),
                  torch.randn(1, SDXL_DIMS.pooled_dim), torch.randn(1, TIME_IDS_DIM))
        image = torch.zeros(1, 1024, 1024, 3, dtype=torch.uint8)
        cases = (("unet", UNet(unet, lora=False), inputs), ("controlnet", ControlNet(controlnet), (*inputs, image)),
                 *((f"union, {modes} mode{'s' if modes > 1 else ''}", UnionControlNet(union), (*inputs, *union_inputs(modes, image)))
                   for modes in (1, 2)))
    counted = counted_tflops(cases)
    for name, tflop in counted.items():
        log(f"flops: {name} {tflop} TFLOP per step at 1024x1024")
    counted["parameters_b"] = {name: round(sum(p.numel() for p in module.parameters()) / 1e9, 3)
                               for name, module in (("controlnet", controlnet), ("union", union), ("unet", unet))}
    return counted


def export_full_size(work: Path, skeletons: Path | None) -> dict:
    """SDXL's ControlNet and ControlNet-Union and the depth estimator (and, for skeletons, unet_control)
    exported from random weights, in fp32 and fp16; time and peak RSS."""
    import torch

    from contract import layout, networks
    from export.depth import depth_anything_v2_small_config
    from export.modules import ControlNet, DepthEstimator, UNet, UnionControlNet
    from export.onnx_export import export_network
    from export.sdxl import build_component

    from .scale import keep_skeleton

    results = {}
    plans = [(name, dtype) for dtype in ("fp32", "fp16") for name in ENGINE_NETWORKS]  # fp32: ONNX Runtime; fp16: engines
    plans += [("unet_control", "fp16")] if skeletons else []
    for name, dtype in plans:
        torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
        start = time.perf_counter()
        torch.manual_seed(60)
        if name in ("controlnet", "union_controlnet"):  # the UNet's config alone: from_unet without its weights
            union = name == "union_controlnet"
            model = sdxl_controlnet(build_component("unet", device="meta"), union=union).to(torch_dtype)
            module = UnionControlNet(model) if union else ControlNet(model)
        elif name == "depth_estimator":  # Depth-Anything-V2-Small's architecture
            from transformers import DepthAnythingForDepthEstimation

            module = DepthEstimator(DepthAnythingForDepthEstimation(depth_anything_v2_small_config()).to(torch_dtype))
        else:
            module = UNet(build_component("unet", dtype=torch_dtype))
        out = layout.version_dir(work / dtype, name)
        export_network(module.eval(), networks.NETWORKS[name], networks.SDXL_DIMS, dtype, out)
        (out / layout.EXPORT_INFO_FILE).write_text(json.dumps({"dims": networks.SDXL_DIMS.as_dict()}))
        del module
        gc.collect()
        results[f"export {name} {dtype}"] = {"seconds": round(time.perf_counter() - start, 1),
                                             "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        log(f"full size: {name} {dtype} exported: {results[f'export {name} {dtype}']}")
        if skeletons and dtype == "fp16":
            keep_skeleton(out / layout.ONNX_FILE, skeletons / f"{name}.onnx")
            log(f"full size: {name} skeleton written to {skeletons}")
    return results


def build_engines(onnx: Path, out: Path) -> None:
    """`build-engines ONNX OUT`: TensorRT(-RTX) engines of ENGINE_NETWORKS' fp16 graphs with the production
    configs' settings (the bench's subprocess: its peak memory is the build's)."""
    from contract.layout import TEMPLATES
    from export.engines import BuildSettings, build_engines as build

    build(onnx, out, BuildSettings.from_repository(TEMPLATES), timing_cache=onnx.parent / "rtx.cache", names=ENGINE_NETWORKS)


def engines(work: Path) -> dict:
    """TensorRT-RTX builds the full-size fp16 graphs' engines ahead of time (no GPU), as `make engines-rtx`."""
    from contract import layout

    from . import measure
    from .scale import environment, sizes_mb

    out = work / "engines-rtx"
    run = measure.run([sys.executable, "-m", "benchmarks.controlnet", "build-engines", str(work / "fp16"), str(out)],
                      env={**environment(), "POLYGRAPHY_USE_TENSORRT_RTX": "1"}, phase_pattern=r"\[export\] (\w+): building",
                      log_path=work / "engines.log")
    result = {**run.as_dict(), "builder": "TensorRT-RTX (ahead of time, no GPU)",
              "sizes_mb": {name: sum(sizes_mb(layout.version_dir(out, name), layout.ENGINE_FILE).values()) for name in ENGINE_NETWORKS}}
    if run.returncode:
        lines = run.log.strip().splitlines()
        result["reason"] = [line for line in lines if line.startswith("error:") or "[E]" in line or "Error" in line][-3:] or lines[-3:]
    log(f"engines: {result}")
    return result


def full(work: Path, skeletons: Path | None) -> dict:
    """The full-size networks' exports, one run of each in ONNX Runtime (each its own process), and
    their TensorRT-RTX engines."""
    from .scale import committed_unet_step, ort_step

    results = export_full_size(work, skeletons)
    results["engines"] = engines(work)
    results["ort controlnet fp32"] = ort_step(work / "fp32", "controlnet", work / "ort-controlnet.log")
    results["ort union_controlnet fp32"] = ort_step(work / "fp32", "union_controlnet", work / "ort-union.log")
    results["ort depth_estimator fp32"] = ort_step(work / "fp32", "depth_estimator", work / "ort-depth.log")
    if (unet := committed_unet_step()) is not None:
        results["ort unet fp32 (scale_cpu.json)"] = unet
    log(f"full: {results}")
    return results


def estimate(counted: dict) -> dict:
    """A ControlNet step at 1024² on an H100 (an H200 has its compute), from the counted work at the rate
    NVIDIA's published UNet reaches, and from StreamDiffusion's measured ratio."""
    unet_step_s = H100_UNET_4_STEPS_S / 4
    ratio = counted["controlnet"] / counted["unet"]
    return {"h100_unet_step_ms": round(unet_step_s * 1e3, 1), "counted_ratio": round(ratio, 3),
            "h100_controlnet_step_ms_counted": round(unet_step_s * ratio * 1e3, 1),
            "streamdiffusion_ratio": round(STREAMDIFFUSION_CONTROLNET_OVER_UNET, 3),
            "h100_controlnet_step_ms_streamdiffusion": round(unet_step_s * STREAMDIFFUSION_CONTROLNET_OVER_UNET * 1e3, 1),
            "h100_4_steps_one_controlnet_ms": round(4 * unet_step_s * (1 + ratio) * 1e3, 1),
            "union_2_modes_counted_ratio": round(counted["union, 2 modes"] / counted["unet"], 3),
            "h100_union_2_modes_step_ms_counted": round(unet_step_s * counted["union, 2 modes"] / counted["unet"] * 1e3, 1)}


def write_table(results: dict, path: Path) -> None:
    lines = ["# ControlNets: what they cost", "",
             f"`{results['command']}`, {results['machine']}, {results['minutes']:.1f} min. See benchmarks/controlnet.py.", "",
             f"## Served, tiny model, CPU variant (fp32), {results['size']}x{results['size']}, {STEPS} steps, closed-loop gRPC clients", "",
             "| case | concurrency | requests | images/s | p50 (s) | p95 (s) | requests without ControlNet, p50 (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in results["served"]:
        lines.append(f"| {row['case']} | {row['concurrency']} | {row['requests']} | {row['images_per_s']} | {row['p50_s']} | "
                     f"{row['p95_s']} | {row['plain_p50_s'] if row['plain_p50_s'] is not None else '-'} |")
    lines += ["", f"## Where a step goes: each graph once in ONNX Runtime (CPU, fp32, {results['size']}x{results['size']}, "
              "median of 9, taking turns; unet_lora and unet_control with rank-1 zero LoRA weights, a request without LoRAs)", "",
              "| graph | batch | ms | control inputs (MB) |", "|---|---|---|---|"]
    lines += [f"| {row['graph']} | {row['batch']} | {row['ms']} | {row['control_inputs_mb']} |" for row in results["graph_steps"]]
    lines += ["", "The tiny ControlNet is a copy of the tiny UNet's encoder (ControlNetModel.from_unet): on this model a "
              "ControlNet step costs a large part of a UNet step; at full size the ratio is the counted one below."]
    counted = results["flops"]
    lines += ["", "## Work per step at 1024x1024, one row (FlopCounterMode, meta device)", "",
              "| network | TFLOP per step | parameters (billions) |", "|---|---|---|",
              f"| UNet (SDXL base) | {counted['unet']} | {counted['parameters_b']['unet']} |",
              f"| ControlNet (SDXL, canny's architecture) | {counted['controlnet']} | {counted['parameters_b']['controlnet']} |",
              f"| ControlNet-Union (xinsir's architecture), 1 mode | {counted['union, 1 mode']} | {counted['parameters_b']['union']} |",
              f"| ControlNet-Union, 2 modes (one pass) | {counted['union, 2 modes']} | {counted['parameters_b']['union']} |"]
    if "full" in results:
        full_ = results["full"]
        lines += ort_step_lines("## Full size on this CPU: one step in ONNX Runtime, fp32, 512x512, batch 1", "controlnet",
                                full_["ort controlnet fp32"], full_.get("ort unet fp32 (scale_cpu.json)"))
        step, row = full_["ort union_controlnet fp32"], next(i for i, line in enumerate(lines) if line.startswith("| controlnet (this run)"))
        lines.insert(row + 1, f"| union_controlnet, 2 modes (this run) | {step.get('load_s')} s | {step.get('run_s')} s | "
                              f"{step.get('loaded_rss_gib')} GiB | {step.get('max_rss_gib')} GiB |")
        step = full_["ort depth_estimator fp32"]
        lines.insert(row + 2, f"| depth_estimator, 518x518 (this run) | {step.get('load_s')} s | {step.get('run_s')} s | "
                              f"{step.get('loaded_rss_gib')} GiB | {step.get('max_rss_gib')} GiB |")
        exports = "; ".join(f"{key[len('export '):]}: {value['seconds']} s, process peak {value['peak_rss_gib']} GiB"
                            for key, value in full_.items() if key.startswith("export "))
        lines.append(f"\nExports from random weights (build, trace, write): {exports}.")
        built = full_.get("engines", {})
        if built:
            phases = ", ".join(f"{p['name']} {p['seconds']} s / {p['peak_rss_gib']} GiB" for p in built["phases"])
            sizes = ", ".join(f"{name} {size:,.0f} MB" for name, size in built["sizes_mb"].items())
            status = "built" if built["returncode"] == 0 else f"FAILED: {' '.join(built.get('reason', []))}"
            lines.append(f"\nTensorRT-RTX engines of the fp16 graphs (ahead of time, no GPU; the production configs' profiles): "
                         f"{status} in {built['seconds']} s, process peak {built['max_rss_gib']} GiB ({phases}); engines: {sizes}.")
    est = results["estimate"]
    lines += ["", "## Estimate on a GPU, 1024x1024, batch 1 (not measured: no GPU here)", "",
              f"Basis: NVIDIA's published H100 TensorRT UNet step (SDXL + LCM, {est['h100_unet_step_ms']} ms), scaled by the "
              f"counted ratio ({est['counted_ratio']}): a ControlNet step about {est['h100_controlnet_step_ms_counted']} ms; "
              f"StreamDiffusion's measured TensorRT ratio ({est['streamdiffusion_ratio']}) gives "
              f"{est['h100_controlnet_step_ms_streamdiffusion']} ms. Four steps with one ControlNet: about "
              f"{est['h100_4_steps_one_controlnet_ms']} ms of UNet and ControlNet work (without: {4 * est['h100_unet_step_ms']:.1f} ms). "
              f"A ControlNet-Union pass with two modes (counted ratio {est['union_2_modes_counted_ratio']}): about "
              f"{est['h100_union_2_modes_step_ms_counted']} ms a step, against two ControlNets' {2 * est['h100_controlnet_step_ms_counted']:.1f} ms. "
              "An H200 has the H100's compute: the same figures, give or take its faster memory."]
    lines.append("")
    path.write_text("\n".join(lines))


def build_parser():
    parser = bench_parser("controlnet", __doc__, "controlnet_cpu")
    parser.add_argument("--size", type=int, default=512, help="served height and width (default 512)")
    parser.add_argument("--requests", type=int, default=8, help="requests per client and case (default 8)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full-size exports, ONNX Runtime runs and engine builds (about 12 minutes, 15 GiB)")
    parser.add_argument("--skeletons", type=Path, metavar="DIR", help="also export the full-size unet_control in fp16 and keep "
                        "the skeletons of the fp16 controlnet, union_controlnet, unet_control and depth_estimator in DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build-engines"]:
        build_engines(Path(argv[1]), Path(argv[2]))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    results = {"size": args.size, "requests_per_client": args.requests}
    with tempfile.TemporaryDirectory(prefix="bench-controlnet-") as tmp:
        results["served"], results["graph_steps"] = served(Path(tmp), args.size, args.requests)
        results["flops"] = flops()
        if not args.skip_full:
            results["full"] = full(Path(tmp), args.skeletons)
    results["estimate"] = estimate(results["flops"])
    save_run("controlnet", argv, started, args, parser, results, write_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
