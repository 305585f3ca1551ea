"""The 8-bit UNet (FP8, INT8) and VAE decoder (INT8): their error against the float graphs, ONNX
Runtime's CPU speed with them, and TensorRT-RTX's verdict on each graph.

    python -m benchmarks.quantization [--held-out 8] [--size 512] [--skip-full] [--full-size 512]
                                      [--full-sweep] [--out build/results/quantization_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results refreshes the committed ones. The weights are random (no network
here): quantization error depends on the weights and on what the activations look like, so these
figures show the method works end to end and how large its error is on these weights, not the
quality loss of a trained SDXL (MLPerf's FID/CLIP gate is the judge of that; on a GPU box:
`python -m export onnx --preset lcm-sdxl --unet-precision fp8` and look).

1. `tiny`: the tiny pipeline (seed 0, LoRA fused) exported by the CLI in fp32 as float, with
   `--unet-precision int8 --vae-precision int8`, and with `--unet-precision fp8`, each calibrated on
   the default prompts (the first 32 of export/calibration_prompts.txt) with the recipe's own loop
   (LCM, 4 steps, no CFG, 1024x1024); and with `--preset sdxl-base` (Euler, 20 steps, CFG 5) on 8
   prompts. Then, on HELD_OUT prompts the calibration did not see (the file's last ones), at SIZE²:
   - per step: the float UNet graph runs the recipe's loop; at each step the 8-bit graph gets the
     same inputs; its output's SNR against the float output, by step and timestep;
   - end to end: the 8-bit UNet runs its own loop and the 8-bit (or float) VAE decodes; the image
     against the float graphs' image: mean and max pixel difference (0-255) and PSNR;
   - speed: one UNet step at SIZE², batch 1 and 2, in ONNX Runtime (the CPU variant's options),
     median of 5 after a warm-up, float fp32 against each 8-bit graph;
   - TensorRT-RTX: the fp16 graphs (float, int8 and fp8 UNet, float and int8 VAE decoder; calibrated
     on 8 prompts at 256²) built with the production profiles by export/engines.py: built or
     refused, and the plan's size.
   - sweep: each group of the UNet's layers kept in float alone (the tiny UNet calibrated as the
     export does): the output SNR it gains, over LCM's 4 timesteps.
2. `full`: SDXL base 1.0's UNet and VAE at full size (export/sdxl.py's exact architectures, random
   weights), fp32: the UNet quantized in int8 and in fp8 (calibrated on 2 prompts of random text
   encoders' embeddings, 4 LCM steps at FULL_SIZE²), the VAE decoder in int8 (on the final latents);
   each graph and its float graph run by ONNX Runtime in a process of its own on the same inputs at
   FULL_SIZE²: output SNR, seconds per run, peak memory. --full-sweep: the sensitivity sweep of the
   tiny section on the full-size UNet too (32x32 latents, each precision's own kept layers).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .measure import bench_parser, median_seconds, run, save_run
from .throughput import log, tiny_pipeline

HELD_OUT = 8
SPEED_REPEATS = 5
TINY_EXPORTS = {  # name: CLI flags beside --model/--lora/--vae and --dtype fp32
    "float": [],
    "int8": ["--unet-precision", "int8", "--vae-precision", "int8"],
    "fp8": ["--unet-precision", "fp8"],
    "sdxl-base float": ["--preset", "sdxl-base"],
    "sdxl-base int8": ["--preset", "sdxl-base", "--unet-precision", "int8", "--vae-precision", "int8", "--calibration-count", "8"],
    "sdxl-base fp8": ["--preset", "sdxl-base", "--unet-precision", "fp8", "--calibration-count", "8"],
}


def snr_db(reference: np.ndarray, value: np.ndarray) -> float:
    noise = ((reference.astype(np.float64) - value) ** 2).mean()
    return float("inf") if noise == 0 else round(float(10 * np.log10((reference.astype(np.float64) ** 2).mean() / noise)), 2)


def session(repository: Path, name: str):
    import onnxruntime as ort

    from contract import layout
    from serving.ort_session import session_options

    path = layout.onnx_path(repository, name)
    return ort.InferenceSession(str(path), session_options(path), providers=["CPUExecutionProvider"])


def exported_as(out: Path, flags: list[str], dtype: str) -> bool:
    """Whether `out` already holds this export (a run resumed in the same --work): its recipe, and its UNet
    and VAE decoder in the precisions the flags ask for."""
    from contract import layout
    from contract.configs import recipe_file
    from contract.recipes import read_recipe

    def flag(name: str, default: str) -> str:
        return flags[flags.index(name) + 1] if name in flags else default

    try:
        recipe = read_recipe(recipe_file(out))
        precisions = {name: layout.graph_precision(layout.version_dir(out, name)) for name in ("unet", "vae_decoder")}
    except (OSError, ValueError):
        return False
    return (recipe is not None and recipe.name == flag("--preset", "custom")
            and precisions == {"unet": flag("--unet-precision", dtype), "vae_decoder": flag("--vae-precision", dtype)})


def export(tiny: Path, out: Path, flags: list[str], dtype: str = "fp32") -> Path:
    from export.cli import main as export_main

    if exported_as(out, flags, dtype):
        log(f"tiny: {' '.join(flags) or 'float'} ({dtype}): reusing {out} (already exported in this --work)")
        return out

    base = ["onnx", "--model", str(tiny), "--vae", str(tiny / "alt_vae"), "--preview-vae", str(tiny / "preview_vae"),
            "--safety-checker", str(tiny / "safety_checker"), "--dtype", dtype, "--out", str(out)]
    if "--preset" not in flags:
        base += ["--lora", str(tiny / "lora")]
    start = time.perf_counter()
    if export_main([*base, *flags]) != 0:
        raise SystemExit(f"the export {' '.join(flags)} failed")
    log(f"tiny: exported {' '.join(flags) or 'float'} ({dtype}) in {time.perf_counter() - start:.0f} s")
    return out


class GraphUNet:
    """diffusers' UNet call answered by ONNX Runtime: the `driver` graph's output goes on; the
    `probe` graph (if any) gets the same inputs and its SNR against the driver's is recorded."""

    def __init__(self, torch_unet, driver, probe=None):
        self.unet, self.driver, self.probe, self.records = torch_unet, driver, probe, []
        torch_unet.forward = self.forward  # diffusers reads the config and add_embedding from the module

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict=False, **_):
        import torch

        rows = sample.shape[0]
        feeds = {"sample": sample.numpy(), "timestep": np.full([rows], float(timestep), np.float32),
                 "encoder_hidden_states": encoder_hidden_states.numpy(), "text_embeds": added_cond_kwargs["text_embeds"].numpy(),
                 "time_ids": added_cond_kwargs["time_ids"].numpy()}
        out = self.driver.run(None, feeds)[0]
        if self.probe is not None:
            self.records.append({"timestep": int(timestep), "snr_db": snr_db(out, self.probe.run(None, feeds)[0])})
        return (torch.from_numpy(out),)


def recipe_latents(pipe, unet: GraphUNet, scheduler, prompt_embeds, recipe, size: int, seed: int):
    """The recipe's loop through `unet`, diffusers' pipeline driving it; the final latents."""
    from export.quantize import _calibration_pipeline

    loop = _calibration_pipeline(unet.unet, scheduler)
    embeds, negative, pooled, negative_pooled = prompt_embeds
    cfg = {"negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled} if recipe.default_guidance > 1 else {}
    import torch

    with torch.no_grad():
        return loop(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=recipe.default_steps,
                    guidance_scale=recipe.default_guidance, height=size, width=size, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), **cfg).images


def error_rows(tiny: Path, repositories: dict[str, Path], held_out: int, size: int) -> list[dict]:
    """Per-step SNR and the end-to-end image difference of each 8-bit repository against its float one."""
    import torch

    from contract import layout
    from contract.recipes import read_recipe
    from contract.configs import recipe_file
    from export.onnx_export import recipe_scheduler
    from export.quantize import DEFAULT_PROMPTS_FILE, read_prompts
    from export.sources import LoraSpec, Sources, load_pipeline

    prompts = read_prompts(DEFAULT_PROMPTS_FILE, 1000)[-held_out:]
    rows = []
    for name, repository in repositories.items():
        if "float" in name:
            continue
        float_repo = repositories[name.replace("int8", "float").replace("fp8", "float")]
        recipe = read_recipe(recipe_file(repository))
        loras = () if recipe.loras == () else (LoraSpec(str(tiny / "lora")),)
        pipe = load_pipeline(Sources(str(tiny), loras, str(tiny / "alt_vae")), "fp32",
                             components=("unet", "text_encoder", "text_encoder_2")).pipe
        scheduler = lambda: recipe_scheduler(recipe, pipe.scheduler.config)  # noqa: E731 - a fresh one per loop
        float_unet, q_unet = session(float_repo, "unet"), session(repository, "unet")
        float_vae, q_vae = session(float_repo, "vae_decoder"), session(repository, "vae_decoder")
        steps, images = [], []
        for index, prompt in enumerate(prompts):
            with torch.no_grad():
                embeds = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=recipe.default_guidance > 1)
            teacher = GraphUNet(pipe.unet, float_unet, q_unet)
            reference = recipe_latents(pipe, teacher, scheduler(), embeds, recipe, size, seed=index)
            steps.append(teacher.records)
            own = recipe_latents(pipe, GraphUNet(pipe.unet, q_unet), scheduler(), embeds, recipe, size, seed=index)
            wanted = float_vae.run(None, {"latents": reference.numpy()})[0].astype(int)
            got = q_vae.run(None, {"latents": own.numpy()})[0].astype(int)
            difference = np.abs(got - wanted)
            mse = float((difference ** 2).mean())
            images.append({"mean": float(difference.mean()), "max": int(difference.max()),
                           "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse),
                           "latent_snr_db": snr_db(reference.numpy(), own.numpy())})
        by_step = [{"step": i + 1, "timestep": steps[0][i]["timestep"],
                    "snr_db": round(statistics.mean(p[i]["snr_db"] for p in steps), 2),
                    "min_snr_db": min(p[i]["snr_db"] for p in steps)} for i in range(len(steps[0]))]
        row = {"export": name, "recipe": recipe.name, "unet": layout.graph_precision(layout.version_dir(repository, "unet")),
               "vae_decoder": layout.graph_precision(layout.version_dir(repository, "vae_decoder")),
               "prompts": len(prompts), "size": size, "steps": by_step,
               "image_mean_difference": round(statistics.mean(i["mean"] for i in images), 2),
               "image_max_difference": max(i["max"] for i in images),
               "image_psnr_db": round(statistics.mean(i["psnr_db"] for i in images), 2),
               "latent_snr_db": round(statistics.mean(i["latent_snr_db"] for i in images), 2)}
        log(f"tiny: {name}: per step {[s['snr_db'] for s in by_step][:6]}..., image mean diff {row['image_mean_difference']}, "
            f"PSNR {row['image_psnr_db']} dB")
        rows.append(row)
        del pipe
        gc.collect()
    return rows


def speed_rows(repositories: dict[str, Path], size: int) -> list[dict]:
    """One UNet step in ONNX Runtime: median of SPEED_REPEATS after a warm-up, per graph and batch."""
    from contract import networks
    from contract.networks import ModelDims
    from export.onnx_export import example_inputs

    rows = []
    for name in ("float", "int8", "fp8"):
        info = json.loads((repositories[name] / "unet" / "1" / "export.json").read_text())
        dims = ModelDims(**info["dims"])
        unet = session(repositories[name], "unet")
        for batch in (1, 2):
            feeds = {k: v.numpy() for k, v in example_inputs(networks.UNET, dims, "FP32", batch=batch, latent_height=size // 8,
                                                              latent_width=size // 8).items()}
            seconds = median_seconds(lambda: unet.run(None, feeds), SPEED_REPEATS)
            rows.append({"unet": info["precision"], "batch": batch, "size": size, "ms": round(seconds * 1e3, 1)})
            log(f"speed: {rows[-1]}")
    return rows


_BUILD = ("from pathlib import Path; import sys; from contract.layout import TEMPLATES; "
          "from export.engines import BuildSettings, build_engines; "
          "build_engines(Path(sys.argv[1]), Path(sys.argv[2]), BuildSettings.from_repository(TEMPLATES), names=('unet', 'vae_decoder'))")


def rtx_rows(tiny: Path, work: Path) -> list[dict]:
    """TensorRT-RTX's verdict on the fp16 graphs (float, and the 8-bit ones), built with the production
    profiles by export/engines.py in a process of its own (the builder is chosen at import)."""
    import os

    from contract import layout

    rows = []
    for label, flags in (("float", []), ("int8", ["--unet-precision", "int8", "--vae-precision", "int8"]),
                         ("fp8", ["--unet-precision", "fp8"])):
        calibration = ["--calibration-count", "8", "--calibration-size", "256"] if flags else []
        repository = export(tiny, work / f"fp16-{label}", [*flags, *calibration], "fp16")
        out = work / f"rtx-{label}"
        ran = run([sys.executable, "-c", _BUILD, str(repository), str(out)], env={**os.environ, "POLYGRAPHY_USE_TENSORRT_RTX": "1"},
                  log_path=work / f"rtx-{label}.log", echo=False)
        for name in ("unet", "vae_decoder"):
            if label == "fp8" and name == "vae_decoder":
                continue  # the VAE has no fp8 option: the same float graph as the float repository's
            plan = out / name / "1" / "model.plan"
            precision = layout.graph_precision(layout.version_dir(repository, name))
            rows.append({"graph": f"{name} {precision}", "verdict": "built" if plan.exists() else "refused",
                         "plan_mb": round(plan.stat().st_size / 1e6, 1) if plan.exists() else None,
                         "message": "" if plan.exists() else ran.log.strip()[-300:]})
            log(f"tensorrt-rtx: {rows[-1]}")
    return rows


def tiny(work: Path, held_out: int, size: int) -> dict:
    tiny_dir = tiny_pipeline(work)
    repositories = {name: export(tiny_dir, work / name.replace(" ", "-"), flags) for name, flags in TINY_EXPORTS.items()}
    return {"errors": error_rows(tiny_dir, repositories, held_out, size), "speed": speed_rows(repositories, size),
            "sweep": tiny_sweep(tiny_dir), "tensorrt_rtx": rtx_rows(tiny_dir, work)}


# --- Sensitivity sweep ----------------------------------------------------------------------------

# Groups of UNet layers a sweep keeps in the float dtype one at a time (module-name regexes).
SWEEP_GROUPS = {
    "attention q/k/v": r".*attn[12]\.to_[qkv]$", "attention out": r".*attn[12]\.to_out\.0$",
    "feed-forward": r".*\.ff\.net\..*", "proj_in/proj_out": r".*attentions\.\d+\.proj_(in|out)$",
    "resnet conv1": r".*resnets\.\d+\.conv1$", "resnet conv2": r".*resnets\.\d+\.conv2$",
    "downsamplers": r".*downsamplers.*", "upsamplers": r".*upsamplers.*",
    "down_blocks": r"^down_blocks\..*", "mid_block": r"^mid_block\..*", "up_blocks": r"^up_blocks\..*",
}
SWEEP_TIMESTEPS = (999, 759, 499, 259)  # LCM's 4 steps (lcm-sdxl's default schedule)
SWEEP_LATENT = 32  # full size: 256x256 inputs (a forward of the full UNet in seconds on 2 cores)


def sweep(unet, dims, latent: int) -> dict:
    """Keep each group of SWEEP_GROUPS in float (its quantizers off) and measure the UNet output's SNR
    against the float UNet, over SWEEP_TIMESTEPS on random inputs: the dB each group's quantization
    costs. `unet`: diffusers' UNet with calibrated ModelOpt quantizers (export/quantize.py)."""
    import re

    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    from contract import networks
    from export.modules import UNet
    from export.onnx_export import example_inputs

    module = UNet(unet, lora=False).eval()
    dtype = next(unet.parameters()).dtype
    batches = []
    for seed, timestep in enumerate(SWEEP_TIMESTEPS):
        inputs = example_inputs(networks.UNET, dims, "FP32", batch=1, latent_height=latent, latent_width=latent, seed=seed)
        inputs["timestep"] = torch.full_like(inputs["timestep"], float(timestep))
        batches.append(tuple(v.to(dtype) if v.is_floating_point() else v for v in inputs.values()))
    quantizers = {name: q for name, q in unet.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled}

    def outputs(enabled: set[str]) -> list:
        for name, quantizer in quantizers.items():
            quantizer.enable() if name in enabled else quantizer.disable()
        with torch.no_grad():
            return [module(*batch).double() for batch in batches]

    def snr(values) -> float:
        return round(statistics.mean(snr_db(r.numpy(), v.numpy()) for r, v in zip(reference, values)), 2)

    reference = outputs(set())
    everything = snr(outputs(set(quantizers)))
    rows = []
    for group, pattern in SWEEP_GROUPS.items():
        layers = {name.rsplit(".", 1)[0] for name in quantizers if re.match(pattern, name.rsplit(".", 1)[0])}
        kept = {name for name in quantizers if name.rsplit(".", 1)[0] in layers}
        value = snr(outputs(set(quantizers) - kept))
        rows.append({"group": group, "layers": len(layers), "snr_db": value, "gain_db": round(value - everything, 2)})
    outputs(set(quantizers))  # as calibrated
    return {"all_quantized_snr_db": everything, "groups": sorted(rows, key=lambda r: -r["gain_db"])}


def tiny_sweep(tiny_dir: Path) -> dict:
    """The sweep on the tiny UNet (LoRA fused), calibrated as the export does (default prompts, LCM,
    1024²) but with the published kept layers only (export/quantize.py's UNET_KEEP), in both precisions."""
    from contract.recipes import custom_recipe
    from export.onnx_export import recipe_scheduler
    from export.quantize import UNET_KEEP, DEFAULT_PROMPTS_FILE, Calibration, encode_prompts, quantize_unet, read_prompts
    from export.sources import LoraSpec, Sources, load_pipeline, model_dims

    results = {}
    recipe = custom_recipe(str(tiny_dir), "lcm")
    calibration = Calibration.for_recipe(recipe, read_prompts(DEFAULT_PROMPTS_FILE), source=DEFAULT_PROMPTS_FILE.name)
    sources = Sources(str(tiny_dir), (LoraSpec(str(tiny_dir / "lora")),), str(tiny_dir / "alt_vae"))
    dims = model_dims(sources)
    for precision in ("int8", "fp8"):
        pipe = load_pipeline(sources, "fp32", components=("unet", "text_encoder", "text_encoder_2")).pipe
        quantize_unet(pipe.unet, recipe_scheduler(recipe, pipe.scheduler.config), encode_prompts(pipe, calibration), calibration,
                      precision, keep=UNET_KEEP)  # the published layers only: what the sweep adds to them
        results[precision] = sweep(pipe.unet, dims, 64)
        log(f"sweep: tiny {precision}: {results[precision]}")
    return results


# --- Full size ------------------------------------------------------------------------------------

FULL_GRAPHS = (("float", "unet"), ("int8", "unet"), ("fp8", "unet"), ("float", "vae_decoder"), ("int8", "vae_decoder"))


def full(work: Path, size: int, with_sweep: bool = False) -> dict:
    """The full-size graphs, exported in a process of their own (which holds a 10 GB UNet: this process
    stays small for the comparisons), or reused when a run in the same --work left them all; then each
    8-bit graph compared with its float one in a process of its own."""
    from contract import layout

    record = work / "exports.json"
    if all(layout.onnx_path(work / name, network).exists() for name, network in FULL_GRAPHS) and not with_sweep:
        results = json.loads(record.read_text()) if record.exists() else {"size": size, "note": "graphs reused from an earlier run in --work; its timings were not recorded"}
        log(f"full: reusing the graphs in {work}")
    else:
        ran = run([sys.executable, "-m", "benchmarks.quantization", "full-export", str(work), str(size), str(int(with_sweep))],
                  log_path=work.parent / "full-export.log", echo=True)
        if ran.returncode != 0:
            raise RuntimeError(f"the full-size export failed (exit {ran.returncode}): {ran.log[-400:]}")
        results = json.loads(record.read_text())
        results["export_max_rss_gib"] = round(ran.max_rss / 2**30, 2)
    results["compared"] = {}
    for name, precision in (("unet", "int8"), ("unet", "fp8"), ("vae_decoder", "int8")):
        ran = run([sys.executable, "-m", "benchmarks.quantization", "ort-compare", str(work / "float"), str(work / precision),
                   name, str(size)], log_path=work / f"compare-{name}-{precision}.log", echo=False)
        figures = json.loads(ran.log.strip().splitlines()[-1]) if ran.returncode == 0 else {
            "error": f"exit {ran.returncode}" + (" (killed: SIGKILL, the OOM killer on this machine)" if ran.returncode in (-9, 137) else "")
                     + (f": {ran.log.strip()[-400:]}" if ran.log.strip() else "")}
        results["compared"][f"{name} {precision}"] = {**figures, "max_rss_gib": round(ran.max_rss / 2**30, 2)}
        log(f"full: {name} {precision}: {results['compared'][f'{name} {precision}']}")
    return results


def full_export(work: Path, size: int, with_sweep: bool = False) -> None:
    """In its own process: the full-size UNet and VAE decoder exported float and 8-bit; timings to WORK/exports.json."""
    import torch

    from contract import layout, networks
    from contract.networks import SDXL_DIMS
    from contract.recipes import PRESETS
    from export.modules import UNet, VaeDecoder
    from export.onnx_export import export_network
    from export.quantize import (DEFAULT_PROMPTS_FILE, Calibration, PromptEmbeddings, quantize_unet, quantize_vae_decoder,
                                 read_prompts)
    from export.sdxl import build_component
    from export.tiny import sdxl_scheduler

    results: dict = {"size": size}
    recipe = PRESETS["lcm-sdxl"]
    calibration = Calibration.for_recipe(recipe, read_prompts(DEFAULT_PROMPTS_FILE, 2), size=size, source="random text encoders")
    generator = torch.Generator().manual_seed(0)
    count = len(calibration.prompts)
    # Random text encoders' outputs have no meaning either: unit-variance embeddings of the right shapes.
    embeddings = PromptEmbeddings(torch.randn(count, SDXL_DIMS.seq_len, SDXL_DIMS.text_dim, generator=generator),
                                  torch.randn(count, SDXL_DIMS.pooled_dim, generator=generator), None, None)
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(sdxl_scheduler().config)

    def write(module, spec, name: str, precision: str | None):
        out = layout.version_dir(work / name, spec.name)
        start = time.perf_counter()
        export_network(module, spec, SDXL_DIMS, "fp32", out, precision=precision)
        (out / layout.EXPORT_INFO_FILE).write_text(json.dumps({"dims": SDXL_DIMS.as_dict(), "precision": precision or "fp32"}))
        results[f"export {spec.name} {name} s"] = round(time.perf_counter() - start, 1)
        log(f"full: {spec.name} {name} exported in {results[f'export {spec.name} {name} s']} s")

    torch.manual_seed(1)
    unet = build_component("unet", dtype=torch.float32).eval()
    write(UNet(unet), networks.UNET, "float", None)
    latents = None
    for precision in ("int8", "fp8"):
        start = time.perf_counter()
        report, latents = quantize_unet(unet, scheduler, embeddings, calibration, precision)
        results[f"calibrate unet {precision} s"] = round(time.perf_counter() - start, 1)
        results[f"unet {precision} layers"] = {"quantized": report.quantized_layers, "kept": len(report.kept_layers)}
        if with_sweep:
            start = time.perf_counter()
            results[f"sweep {precision}"] = sweep(unet, SDXL_DIMS, SWEEP_LATENT)
            log(f"full: sweep {precision} in {time.perf_counter() - start:.0f} s: {results[f'sweep {precision}']}")
        write(UNet(unet), networks.UNET, precision, precision)
        del unet
        gc.collect()
        if precision == "int8":
            torch.manual_seed(1)
            unet = build_component("unet", dtype=torch.float32).eval()
    torch.manual_seed(2)
    vae = build_component("alt_vae", dtype=torch.float32).eval()
    write(VaeDecoder(vae), networks.VAE_DECODER, "float", None)
    quantize_vae_decoder(vae, VaeDecoder(vae), latents, "int8", calibration)
    write(VaeDecoder(vae), networks.VAE_DECODER, "int8", "int8")
    (work / "exports.json").write_text(json.dumps(results, indent=2) + "\n")


def ort_compare(float_repo: Path, repo: Path, name: str, size: int) -> None:
    """In its own process: the float graph, then the 8-bit one, on the same inputs; prints one JSON line."""
    from contract import layout, networks
    from contract.networks import ModelDims
    from export.onnx_export import example_inputs

    dims = ModelDims(**json.loads((layout.version_dir(repo, name) / layout.EXPORT_INFO_FILE).read_text())["dims"])
    inputs = {k: v.numpy() for k, v in example_inputs(networks.NETWORKS[name], dims, "FP32", batch=1, latent_height=size // 8,
                                                      latent_width=size // 8).items()}
    figures, outputs = {}, []
    for label, repository in (("float", float_repo), ("8-bit", repo)):
        start = time.perf_counter()
        graph = session(repository, name)
        figures[f"{label} load s"] = round(time.perf_counter() - start, 1)
        graph.run(None, inputs)
        start = time.perf_counter()
        outputs.append(graph.run(None, inputs)[0])
        figures[f"{label} run s"] = round(time.perf_counter() - start, 2)
        del graph
        gc.collect()
    figures["snr_db"] = snr_db(outputs[0], outputs[1])
    if outputs[0].dtype == np.uint8:
        figures["mean_pixel_difference"] = round(float(np.abs(outputs[0].astype(int) - outputs[1]).mean()), 2)
    print(json.dumps(figures))


# --- Results --------------------------------------------------------------------------------------

def write_table(results: dict, path: Path) -> None:
    lines = ["# 8-bit UNet and VAE decoder: error, CPU speed, TensorRT-RTX", "",
             f"`{results['command']}`, {results['machine']}, {results['minutes']:.1f} min. See benchmarks/quantization.py.", "",
             "Random weights (tiny pipeline, and SDXL's full-size architecture): the error figures show the method end to "
             "end on these weights, not a trained model's quality loss.", ""]
    tiny_results = results.get("tiny")
    if tiny_results:
        lines += [f"## Tiny pipeline, {tiny_results['errors'][0]['prompts']} held-out prompts at "
                  f"{tiny_results['errors'][0]['size']}x{tiny_results['errors'][0]['size']}", "",
                  "UNet output SNR against the float graph on the float loop's inputs, by step (mean over the prompts, "
                  "and the lowest); the image of the 8-bit UNet's own loop (and VAE) against the float graphs' image.", "",
                  "| export | recipe | UNet | VAE | SNR by step (timestep): mean / min dB | latent SNR dB | image mean / max diff | image PSNR dB |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in tiny_results["errors"]:
            steps = "; ".join(f"{s['step']} ({s['timestep']}): {s['snr_db']} / {s['min_snr_db']}" for s in row["steps"])
            lines.append(f"| {row['export']} | {row['recipe']} | {row['unet']} | {row['vae_decoder']} | {steps} | "
                         f"{row['latent_snr_db']} | {row['image_mean_difference']} / {row['image_max_difference']} | {row['image_psnr_db']} |")
        lines += ["", "### ONNX Runtime, one UNet step (CPU variant's session options), median of "
                  f"{SPEED_REPEATS}", "", "| UNet | batch | size | ms | against fp32 |", "|---|---|---|---|---|"]
        base = {(r["batch"]): r["ms"] for r in tiny_results["speed"] if r["unet"] == "fp32"}
        for row in tiny_results["speed"]:
            lines.append(f"| {row['unet']} | {row['batch']} | {row['size']} | {row['ms']} | {base[row['batch']] / row['ms']:.2f}x |")
        lines += sweep_lines("tiny UNet, 64x64 latents", tiny_results["sweep"])
        lines += ["", "### TensorRT-RTX (the builder here, no GPU), production profiles", "",
                  "| graph | verdict | plan MB |", "|---|---|---|"]
        for row in tiny_results["tensorrt_rtx"]:
            lines.append(f"| {row['graph']} | {row['verdict']}{': ' + row['message'] if row['message'] else ''} | {row['plan_mb']} |")
    full_results = results.get("full")
    if full_results and "error" in full_results:
        lines += ["", f"## Full size: failed: {full_results['error']}"]
    elif full_results:
        size = full_results["size"]
        lines += ["", f"## Full size (SDXL base 1.0's UNet and the fp16-fix VAE's architecture, random weights, fp32), {size}x{size}, batch 1", "",
                  "| graph | SNR dB against float | float s per run | 8-bit s per run | speed | peak GiB (both loaded in turn) |",
                  "|---|---|---|---|---|---|"]
        for name, row in full_results["compared"].items():
            if "error" in row:
                lines.append(f"| {name} | failed: {row['error'][-200:]} | | | | |")
                continue
            lines.append(f"| {name} | {row['snr_db']} | {row['float run s']} | {row['8-bit run s']} | "
                         f"{row['float run s'] / row['8-bit run s']:.2f}x | {row['max_rss_gib']} |")
        lines += ["", "Times: " + ", ".join(f"{k} {v}" for k, v in full_results.items() if k.endswith(" s")) + "."]
        sweeps = {p: full_results[f"sweep {p}"] for p in ("int8", "fp8") if f"sweep {p}" in full_results}
        if sweeps:
            lines += sweep_lines(f"full-size UNet, {SWEEP_LATENT}x{SWEEP_LATENT} latents", sweeps, EXPORTED_KEPT)
    path.write_text("\n".join(lines) + "\n")


PUBLISHED_KEPT = ("the published kept layers (MLPerf's, export/quantize.py's UNET_KEEP) in float throughout; this sweep is "
                  "what added INT8's downsampler convolutions to the kept layers")
EXPORTED_KEPT = "each precision's kept layers (as exported) in float throughout"


def sweep_lines(what: str, sweeps: dict, kept: str = PUBLISHED_KEPT) -> list[str]:
    lines = ["", f"### Sensitivity sweep ({what}): each group kept in float alone", "",
             f"UNet output SNR against the float UNet over LCM's 4 timesteps, random inputs, with {kept}; gain: over "
             "everything else quantized.", "",
             "| group | layers | " + " | ".join(f"{p} SNR dB (gain)" for p in sweeps) + " |",
             "|---|---|" + "---|" * len(sweeps)]
    lines.append("| (none kept: all quantized) | | " + " | ".join(str(sweeps[p]["all_quantized_snr_db"]) for p in sweeps) + " |")
    by_group = {p: {row["group"]: row for row in sweeps[p]["groups"]} for p in sweeps}
    first = next(iter(sweeps))
    for row in sweeps[first]["groups"]:
        cells = [f"{by_group[p][row['group']]['snr_db']} ({by_group[p][row['group']]['gain_db']:+})" for p in sweeps]
        lines.append(f"| {row['group']} | {row['layers']} | " + " | ".join(cells) + " |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("quantization", __doc__, "quantization_cpu")
    parser.add_argument("--held-out", type=int, default=HELD_OUT, help=f"held-out prompts for the error figures (default {HELD_OUT})")
    parser.add_argument("--size", type=int, default=512, help="tiny: height and width of the error and speed runs (default 512)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full-size UNet and VAE (about 25 minutes, 20 GiB)")
    parser.add_argument("--full-sweep", action="store_true", help="also the sensitivity sweep of the full-size UNet "
                        "(about 8 minutes a precision on 2 cores)")
    parser.add_argument("--full-size", type=int, default=512, help="full size: calibration and comparison height and width (default 512)")
    parser.add_argument("--work", type=Path, default=Path("build") / "quantization-bench", help="exports and engines (default build/quantization-bench)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ort-compare"]:
        ort_compare(Path(argv[1]), Path(argv[2]), argv[3], int(argv[4]))
        return 0
    if argv[:1] == ["full-export"]:
        full_export(Path(argv[1]), int(argv[2]), argv[3] == "1")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    results: dict = {"tiny": tiny(args.work / "tiny", args.held_out, args.size)}
    if not args.skip_full:
        try:
            results["full"] = full(args.work / "full", args.full_size, args.full_sweep)
        except Exception as error:  # noqa: BLE001 - the tiny figures are kept; the failure is recorded
            import traceback

            traceback.print_exc()
            results["full"] = {"size": args.full_size, "error": f"{type(error).__name__}: {error}", "compared": {}}
    save_run("quantization", argv, started, args, parser, results, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
