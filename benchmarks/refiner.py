"""The standard recipe and its refiner: what they cost here, what each UNet's step is at full size, and
what the standard recipe would take on a GPU (an estimate, with its basis).

    python -m benchmarks.refiner [--requests 5] [--size 512] [--skip-full] [--skeletons DIR]
                                 [--out build/results/refiner_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results refreshes the committed ones.

1. `served`: the tiny pipeline exported with `python -m export onnx --preset sdxl-base-refiner` (its
   refiner/), on a real tritonserver (CPU variant, fp32): one image per request at SIZE², the median
   of REQUESTS, for 4 steps without CFG (the few-step recipes' work), sdxl-base (20 steps, CFG 5:
   high_noise_frac 1, the base alone), sdxl-base-refiner's defaults (16 base + 4 refiner steps, CFG
   5), and the same with CFG truncated after 40% of the steps (the scheduler's cfg_end_fraction 0.4:
   Baseten's end_cfg); the UNet rows per image of each.
2. `flops`: each UNet's work per step at 1024x1024, batch 1 (one row), counted by PyTorch's
   FlopCounterMode on the meta device (SDXL base 1.0's and the refiner's exact architectures:
   export/sdxl.py; no weights needed).
3. `full`: the refiner's UNet at full size (random weights: the time does not depend on them),
   exported to ONNX in fp32 and run by ONNX Runtime at 512x512, batch 1, as `make bench-scale` runs
   the base UNet (benchmarks/results/scale_cpu.json: its figures beside). --skeletons DIR: also the
   fp16 export, kept without weights (`--skeletons tests/data/sdxl_graphs` refreshes the tests' copy).
4. `estimate`: the standard recipe at 1024x1024 on an H100 (and H200: the same compute), from the
   counted work and the effective rate of NVIDIA's published H100 TensorRT UNet (SDXL + LCM, 4 steps,
   102.8 ms: ../shared/DESIGN.md), against Baseten's 1.92 s on an A100 (20 steps, end_cfg, refiner).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from .measure import bench_parser, save_run, started_server
from .scale import ort_step_lines
from .throughput import log, tiny_pipeline

STEPS, GUIDANCE, HANDOFF = 20, 5.0, 0.8  # sdxl-base-refiner's defaults (contract/recipes.py)
# Published figures (../shared/DESIGN.md, "Reference figures"): NVIDIA/Stability's TensorRT SDXL + LCM
# on an H100, batch 1, 1024²: the UNet's 4 steps 102.8 ms, the VAE (TF32) 127.0 ms, CLIP 0.78 ms; their
# A100 total 426.2 ms against the H100's 234.2 ms; Baseten's SDXL: 1.92 s on an A100 (20 steps, CFG for
# the first 40%, the refiner for the last 20%). The VAE decode: 10.47 TFLOP per 1024² image.
H100_UNET_4_STEPS_S, H100_VAE_S, H100_CLIP_S = 0.1028, 0.127, 0.00078
A100_OVER_H100 = 426.2 / 234.2
BASETEN_A100_S = 1.92
CFG_END_BASETEN = 0.4


def unet_rows(steps: int, handoff: float, cfg: bool, cfg_end: float = 1.0) -> dict[str, int]:
    """UNet rows per image of each network: a CFG step is two rows (serving/denoise.py's counting)."""
    from export.tiny import sdxl_scheduler
    from serving.denoise import handoff_index

    scheduler = sdxl_scheduler()
    scheduler.set_timesteps(steps)
    base_steps = handoff_index(scheduler.timesteps, scheduler.config.num_train_timesteps, handoff)
    guided = int(steps * cfg_end) if cfg else 0
    rows = [2 if index < guided else 1 for index in range(steps)]
    return {"unet": sum(rows[:base_steps]), "refiner_unet": sum(rows[base_steps:])}


CASES = (  # name, request options, scheduler parameters, rows
    ("4 steps, no CFG (the few-step recipes' work)", dict(num_inference_steps=4, guidance_scale=1.0, high_noise_frac=1.0), {},
     unet_rows(4, 1.0, False)),
    ("sdxl-base: 20 steps, CFG 5, the base alone", dict(high_noise_frac=1.0), {}, unet_rows(STEPS, 1.0, True)),
    ("sdxl-base-refiner: 20 steps, CFG 5, refiner from 0.8", {}, {}, unet_rows(STEPS, HANDOFF, True)),
    ("the same, CFG for the first 40% (cfg_end_fraction 0.4)", {}, {"cfg_end_fraction": f"{CFG_END_BASETEN:g}"},
     unet_rows(STEPS, HANDOFF, True, CFG_END_BASETEN)),
)


def served(work: Path, requests: int, size: int) -> list[dict]:
    from client import generate
    from contract.configs import CPU_DTYPE, config_files, set_parameters
    from export.cli import main as export_main

    tiny = tiny_pipeline(work)
    repository = work / "repository"
    if export_main(["onnx", "--preset", "sdxl-base-refiner", "--model", str(tiny), "--vae", str(tiny / "alt_vae"),
                    "--dtype", CPU_DTYPE, "--out", str(repository)]) != 0:
        raise SystemExit("the export failed")
    rows = []
    for name, options, parameters, unet in CASES:
        for path in config_files(repository, "scheduler"):
            set_parameters(path, {"cfg_end_fraction": parameters.get("cfg_end_fraction", "1.0")})
        with started_server(repository, work / "tritonserver.log") as server:
            ask = lambda seed: generate("a lighthouse at dusk", url=server.grpc_url, protocol="grpc", seed=seed, height=size,  # noqa: E731
                                        width=size, negative_prompt="blurry", **options)
            ask(0)  # warm-up
            times = [ask(seed).seconds for seed in range(1, requests + 1)]
        rows.append({"case": name, "size": size, "seconds": round(statistics.median(times), 3),
                     "spread": [round(min(times), 3), round(max(times), 3)], "rows": unet})
        log(f"served: {rows[-1]}")
    return rows


def flops() -> dict[str, float]:
    """TFLOP per step (one row) at 1024x1024 of each UNet, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from contract.networks import REFINER_TIME_IDS_DIM, SDXL_DIMS, TIME_IDS_DIM
    from export.modules import UNet
    from export.sdxl import build_component

    counted = {}
    for name, text_dim, time_ids in (("unet", SDXL_DIMS.text_dim, TIME_IDS_DIM),
                                     ("refiner_unet", SDXL_DIMS.refiner_text_dim, REFINER_TIME_IDS_DIM)):
        module = UNet(build_component(name, device="meta"), lora=False)
        with torch.device("meta"):
            inputs = (torch.randn(1, 4, 128, 128), torch.tensor([500.0]), torch.randn(1, SDXL_DIMS.seq_len, text_dim),
                      torch.randn(1, SDXL_DIMS.pooled_dim), torch.randn(1, time_ids))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(*inputs)
        counted[name] = round(counter.get_total_flops() / 1e12, 3)
        log(f"flops: {name} {counted[name]} TFLOP per step at 1024x1024")
    return counted


def full(work: Path, skeletons: Path | None) -> dict:
    """The full-size refiner UNet exported (fp32) and run by ONNX Runtime in its own process."""
    import gc

    import torch

    from contract import layout
    from contract.networks import REFINER_UNET, SDXL_DIMS
    from export.modules import UNet
    from export.onnx_export import export_network
    from export.sdxl import build_component

    from .scale import committed_unet_step, keep_skeleton, ort_step

    repository = work / "full"
    results = {}
    for dtype in ("fp32", "fp16") if skeletons else ("fp32",):
        out = layout.version_dir(repository / dtype, REFINER_UNET.name)
        torch.manual_seed(50)
        start = time.perf_counter()
        module = UNet(build_component("refiner_unet", dtype={"fp16": torch.float16, "fp32": torch.float32}[dtype]), lora=False).eval()
        export_network(module, REFINER_UNET, SDXL_DIMS, dtype, out)
        (out / layout.EXPORT_INFO_FILE).write_text(json.dumps({"dims": SDXL_DIMS.as_dict()}))
        del module
        gc.collect()
        results[f"export {dtype} s"] = round(time.perf_counter() - start, 1)
        log(f"full: refiner_unet exported in {dtype}, {results[f'export {dtype} s']} s")
        if dtype == "fp16":
            keep_skeleton(out / layout.ONNX_FILE, skeletons / f"{REFINER_UNET.name}.onnx")
            log(f"full: skeleton written to {skeletons}")
    results["ort fp32"] = ort_step(repository / "fp32", REFINER_UNET.name, work / "ort-refiner.log")
    if (unet := committed_unet_step()) is not None:
        results["base unet ort fp32 (scale_cpu.json)"] = unet
    log(f"full: {results}")
    return results


def estimate(counted: dict[str, float]) -> dict:
    """Seconds at 1024x1024 on an H100 from the counted work, at the effective rate NVIDIA's published
    UNet time implies (compute-bound at 1024²: CFG's second row costs as much as the first)."""
    rate = 4 * counted["unet"] / H100_UNET_4_STEPS_S  # TFLOP/s the published TensorRT UNet reaches
    rows = {"sdxl-base-refiner (defaults)": unet_rows(STEPS, HANDOFF, True),
            "Baseten's setting (CFG 40%, refiner 20%)": unet_rows(STEPS, HANDOFF, True, CFG_END_BASETEN),
            "sdxl-base (20 steps, CFG 5)": unet_rows(STEPS, 1.0, True),
            "lcm-sdxl (4 steps, no CFG)": unet_rows(4, 1.0, False)}
    table = {}
    for name, count in rows.items():
        tflop = count["unet"] * counted["unet"] + count["refiner_unet"] * counted["refiner_unet"]
        h100 = tflop / rate + H100_VAE_S + H100_CLIP_S
        table[name] = {"unet_tflop": round(tflop, 1), "h100_s": round(h100, 2), "a100_s": round(h100 * A100_OVER_H100, 2)}
    return {"effective_tflops_h100": round(rate, 1), "rows": table, "baseten_a100_s": BASETEN_A100_S}


def write_table(results: dict, path: Path) -> None:
    lines = ["# The standard recipe and the refiner: cost", "",
             f"`{results['command']}`, {results['machine']}, {results['minutes']:.1f} min. See benchmarks/refiner.py.", "",
             f"## Served, tiny model, CPU variant (fp32), one image at {results['size']}x{results['size']}, "
             f"median of {results['requests']}", "",
             "| request | seconds (median) | min to max | UNet rows (base + refiner) |", "|---|---|---|---|"]
    for row in results["served"]:
        lines.append(f"| {row['case']} | {row['seconds']} | {row['spread'][0]} to {row['spread'][1]} | "
                     f"{row['rows']['unet']} + {row['rows']['refiner_unet']} |")
    lines += ["", "The tiny refiner has two resnets per level to the tiny base's one, so here a refiner row costs more "
              "than a base row; the full-size refiner's step is 8% more work than the base's (below)."]
    lines += ["", "## Work per UNet step at 1024x1024, one row (PyTorch's FlopCounterMode, meta device)", "",
              "| network | TFLOP per step |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in results["flops"].items()]
    if "full" in results:
        full_ = results["full"]
        lines += ort_step_lines("## Full size on this CPU: one UNet step in ONNX Runtime, fp32, 512x512, batch 1", "refiner_unet",
                                full_["ort fp32"], full_.get("base unet ort fp32 (scale_cpu.json)"))
        exports = ", ".join(f"{key.split()[1]} {value} s" for key, value in full_.items() if key.startswith("export"))
        lines.append(f"\nThe full-size refiner UNet's export (random init, trace, write): {exports}.")
    est = results["estimate"]
    lines += ["", "## Estimate on a GPU, 1024x1024, one image (not measured: no GPU here)", "",
              f"Basis: NVIDIA's published H100 TensorRT UNet (SDXL, 4 steps, batch 1: {H100_UNET_4_STEPS_S * 1e3:.1f} ms) "
              f"is {est['effective_tflops_h100']} TFLOP/s on the counted work; every UNet row at that rate, plus the "
              f"published VAE ({H100_VAE_S * 1e3:.0f} ms, TF32) and CLIP; the A100 column scales by NVIDIA's A100/H100 "
              f"total ({A100_OVER_H100:.2f}x). An H200 has the H100's compute: the same figure, give or take its faster memory.", "",
              "| recipe | UNet TFLOP | H100 / H200 (s) | A100 (s) |", "|---|---|---|---|"]
    for name, row in est["rows"].items():
        lines.append(f"| {name} | {row['unet_tflop']} | {row['h100_s']} | {row['a100_s']} |")
    lines += ["", f"Baseten's published figure for its setting on an A100: {est['baseten_a100_s']} s."]
    lines.append("")
    path.write_text("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("refiner", __doc__, "refiner_cpu")
    parser.add_argument("--requests", type=int, default=5, help="served requests per case (median; default 5)")
    parser.add_argument("--size", type=int, default=512, help="served height and width (default 512)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full-size refiner export and run (about 6 minutes, 14 GiB)")
    parser.add_argument("--skeletons", type=Path, metavar="DIR", help="also export the full-size refiner in fp16 and keep its skeleton in DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    results = {"requests": args.requests, "size": args.size}
    with tempfile.TemporaryDirectory(prefix="bench-refiner-") as tmp:
        results["served"] = served(Path(tmp), args.requests, args.size)
        results["flops"] = flops()
        if not args.skip_full:
            results["full"] = full(Path(tmp), args.skeletons)
        shutil.rmtree(tmp, ignore_errors=True)
    results["estimate"] = estimate(results["flops"])
    save_run("refiner", argv, started, args, parser, results, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
