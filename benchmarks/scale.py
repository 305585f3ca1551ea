"""Full-size SDXL on this machine: what export, engine build and serving cost at production size.

    python -m benchmarks.scale [--work build/scale] [--out build/results/scale_cpu] [--skip STAGE ...]
                               [--skeletons DIR]

Random weights with SDXL base 1.0's exact architecture (`python -m export random --arch sdxl`; no hub
here), then every stage a user runs, each in its own process, measured as the OS reports it: wall
time and peak resident memory (the kernel's high-water mark of the process, and the sampled sum over
its process tree, per phase of its log), file sizes:

1. `random`: the pipeline written in fp16 (+ an LCM-LoRA-shaped LoRA, + the fp16-fix VAE stand-in);
2. `onnx-fp16`, `onnx-fp32`: `python -m export onnx` with the LoRA fused, per network; the graphs,
   loaded without their weights, are checked against the production configs' dims, and the fp16
   ones are kept without weights in --skeletons (default: <work>/sdxl_graphs; `--skeletons
   tests/data/sdxl_graphs` refreshes the copies the tests check the configs against);
3. `engines`: TensorRT-RTX engines with the production profiles (`python -m export engines`), or
   the reason they cannot build;
4. `ort`: each network alone in ONNX Runtime (the CPU variant's runtime) in fp16 and fp32: session
   load, one run at 512x512 batch 1, resident memory: the CPU default dtype's evidence at full size;
5. `serve`: tritonserver (CPU variant, the CPU default dtype) on the full-size graphs: start time,
   memory per model process, one 512x512 request at 1 and at 4 steps with the server-side time per
   model;
6. `reference`: diffusers' StableDiffusionXLPipeline + LCMScheduler on the same weights, LoRA, seed
   and size, run one component at a time (the whole fp32 pipeline would not fit beside its
   activations), against the served 4-step image: pixel differences, as the serving tests measure.

Results: `<out>.json` (every figure) and `<out>.md`, by default build/results/scale_cpu.*, or under
$BENCH_RESULTS when set; BENCH_RESULTS=benchmarks/results (or --out benchmarks/results/scale_cpu)
refreshes the committed ones. With --skip, the skipped stages' figures come from `<out>.json`, else
from the committed benchmarks/results/scale_cpu.json. About 35 minutes and 35 GB of disk on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks import measure
from contract import layout
from contract.configs import CPU_DTYPE, interface_mismatches, read_config
from contract.networks import NETWORKS, ModelDims

PY = sys.executable
STAGES = ("random", "onnx-fp16", "onnx-fp32", "engines", "ort", "serve", "reference")
SIZE, SEED, PROMPT = 512, 42, "a photo of an astronaut riding a horse on the moon"
SKELETONS = layout.REPO_ROOT / "tests" / "data" / "sdxl_graphs"  # the tests' copies: written only with --skeletons
MEMORY_LIMIT_GIB = 20  # the bound for every stage


def log(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(layout.REPO_ROOT), os.environ.get("PYTHONPATH"))))}


def gib(value: int) -> float:
    return round(value / 2**30, 2)


def sizes_mb(root: Path, pattern: str = "*") -> dict[str, float]:
    return {name: round(size / 1e6, 1) for name, size in measure.directory_sizes(root, pattern).items()}


# --- stages ------------------------------------------------------------------------------------


def stage_random(work: Path) -> dict:
    out = work / "sdxl"
    shutil.rmtree(out, ignore_errors=True)
    run = measure.run([PY, "-m", "export", "random", str(out), "--arch", "sdxl"], env=environment(),
                      phase_pattern=r"\[export\] (\w+)(?: \(.*\))?: random init", log_path=work / "random.log")
    components = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6, 1)
                  for p in sorted(out.iterdir()) if p.is_dir()}
    return {**run.as_dict(), "sizes_mb": components}


def stage_onnx(work: Path, dtype: str, skeletons: Path | None = None) -> dict:
    source, out = work / "sdxl", work / f"repo_{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    run = measure.run(
        [PY, "-m", "export", "onnx", "--model", str(source), "--lora", str(source / "lora"), "--vae", str(source / "alt_vae"),
         "--dtype", dtype, "--out", str(out)],
        env=environment(), phase_pattern=r"\[export\] stage \d+/\d+: (\w+)", log_path=work / f"onnx-{dtype}.log",
    )
    result = {**run.as_dict(), "sizes_mb": {n: sizes_mb(layout.version_dir(out, n), "model.onnx*") for n in layout.served_networks(out)}}
    if run.returncode == 0:
        result["configs_agree"] = check_graphs_against_configs(out)
        if dtype == "fp16":
            keep_skeletons(out, skeletons or work / "sdxl_graphs")
    return result


def check_graphs_against_configs(repository: Path) -> dict[str, str]:
    """Each full-size graph, loaded without its weights, against both config variants the export
    wrote: 'ok' or what differs."""
    from contract.configs import graph_interface

    verdicts = {}
    for name in layout.served_networks(repository):
        interface = graph_interface(layout.onnx_path(repository, name))
        problems = [f"{variant}: {problem}" for variant in ("production", "cpu")
                    for problem in interface_mismatches(read_config(repository, name, variant), interface)]
        verdicts[name] = "; ".join(problems) or "ok"
    return verdicts


def keep_skeletons(repository: Path, skeletons: Path) -> None:
    """The fp16 graphs without their weights (structure, interface, initializer shapes): a few MB, in
    `skeletons` (SKELETONS, the tests' copies, only when asked)."""
    for name in layout.served_networks(repository):  # the refiner's: python -m benchmarks.refiner
        keep_skeleton(layout.onnx_path(repository, name), skeletons / f"{name}.onnx")
    log(f"graph skeletons written to {skeletons}")


def keep_skeleton(graph: Path, target: Path) -> None:
    """One graph without its weights: initializers keep their names, types and shapes, not their data."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(target))


def stage_engines(work: Path) -> dict:
    out = work / "engines-rtx"
    shutil.rmtree(out, ignore_errors=True)
    run = measure.run(
        [PY, "-m", "export", "engines", "--onnx", str(work / "repo_fp16"), "--out", str(out), "--timing-cache", str(work / "rtx.cache")],
        env={**environment(), "POLYGRAPHY_USE_TENSORRT_RTX": "1"}, phase_pattern=r"\[export\] (\w+): building",
        log_path=work / "engines.log",
    )
    result = {**run.as_dict(), "builder": "TensorRT-RTX (ahead of time, no GPU)",
              "sizes_mb": {n: sizes_mb(layout.version_dir(out, n), layout.ENGINE_FILE) for n in layout.served_networks(work / "repo_fp16")}}
    if run.returncode:
        result["reason"] = [line for line in run.log.splitlines() if line.startswith("error:") or "[E]" in line][-3:]
    return result


def stage_ort(work: Path) -> dict:
    results = {}
    for dtype in ("fp32", "fp16"):
        for name in layout.served_networks(work / f"repo_{dtype}"):
            run = measure.run([PY, "-m", "benchmarks.scale", "ort-run", str(work / f"repo_{dtype}"), name, dtype],
                              env=environment(), log_path=work / f"ort-{name}-{dtype}.log", echo=False)
            figures = json.loads(run.log.strip().splitlines()[-1]) if run.returncode == 0 else {"error": run.log[-500:]}
            results[f"{name} {dtype}"] = {**figures, "max_rss_gib": gib(run.max_rss), "seconds": round(run.seconds, 1)}
            log(f"ort {name} {dtype}: {results[f'{name} {dtype}']}")
    return results


def ort_run(repository: Path, name: str, dtype: str) -> None:
    """One network in ONNX Runtime on the CPU, as the CPU variant runs it: load, warm-up, one timed run."""
    import onnxruntime as ort

    from export.onnx_export import COMPUTE_DTYPES, example_inputs
    from serving.ort_session import session_options

    dims = ModelDims(**json.loads((layout.version_dir(repository, name) / layout.EXPORT_INFO_FILE).read_text())["dims"])
    latent = SIZE // dims.vae_scale_factor
    inputs = example_inputs(NETWORKS[name], dims, COMPUTE_DTYPES[dtype], batch=1, latent_height=latent, latent_width=latent)
    feed = {k: v.numpy() for k, v in inputs.items()}
    start = time.perf_counter()
    path = layout.onnx_path(repository, name)
    session = ort.InferenceSession(str(path), session_options(path), providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    loaded_rss = measure.status_kib(os.getpid(), "VmRSS") * 1024
    session.run(None, feed)
    start = time.perf_counter()
    session.run(None, feed)
    run_s = time.perf_counter() - start
    print(json.dumps({"load_s": round(load_s, 1), "run_s": round(run_s, 2), "loaded_rss_gib": gib(loaded_rss),
                      "size": f"{SIZE}x{SIZE}, batch 1"}))


def ort_step(repository: Path, name: str, log_path: Path) -> dict:
    """ort_run of network `name` of `repository` (fp32) in a process of its own: its figures and the
    process's peak RSS (an error's last output instead when it fails)."""
    ran = measure.run([sys.executable, "-m", "benchmarks.scale", "ort-run", str(repository), name, "fp32"], log_path=log_path,
                      echo=False)
    figures = json.loads(ran.log.strip().splitlines()[-1]) if ran.returncode == 0 else {"error": ran.log[-500:]}
    return {**figures, "max_rss_gib": gib(ran.max_rss)}


def committed_unet_step() -> dict | None:
    """The full-size base UNet's fp32 step of the committed `make bench-scale` run (scale_cpu.json), to
    set other networks' steps beside; None where there is none."""
    committed = Path(__file__).parent / "results" / "scale_cpu.json"
    return json.loads(committed.read_text())["stages"]["ort"]["unet fp32"] if committed.exists() else None


def ort_step_lines(heading: str, network: str, step: dict, unet: dict | None) -> list[str]:
    """A results table of one network's full-size step (ort_step) beside the base UNet's (committed_unet_step)."""
    lines = ["", heading, "", "| network | session load | one run | resident after load | peak RSS |", "|---|---|---|---|---|",
             f"| {network} (this run) | {step.get('load_s')} s | {step.get('run_s')} s | {step.get('loaded_rss_gib')} GiB | "
             f"{step.get('max_rss_gib')} GiB |"]
    if unet:
        lines.append(f"| unet (scale_cpu.md) | {unet['load_s']} s | {unet['run_s']} s | {unet['loaded_rss_gib']} GiB | "
                     f"{unet['max_rss_gib']} GiB |")
    return lines


def stage_serve(work: Path, dtype: str) -> dict:
    """tritonserver on the full-size graphs; the requests run from this process, the server's memory
    is sampled over its process group."""
    from client import generate

    repository = work / f"repo_{dtype}"
    server = measure.bench_server(repository, work / f"serve-{dtype}.log")
    with measure.Sampler(lambda: server.process.pid if server.process else None) as sampler:
        start = time.monotonic()
        server.start(timeout_s=1800)
        result = {"dtype": dtype, "ready_s": round(time.monotonic() - start, 1), "requests": {}}
        try:
            result["start_peak_rss_gib"] = gib(sampler.peak())
            result["rss_after_start_gib"] = per_model_rss(server.process.pid)
            log("warm-up request (first calls allocate ONNX Runtime's buffers) ...")
            generate(PROMPT, url=server.http_url, seed=SEED + 1, num_inference_steps=1, height=SIZE, width=SIZE, timeout_s=3600)
            for steps in (1, 4):
                before = statistics(server)
                begun = time.perf_counter()
                response = generate(PROMPT, url=server.http_url, seed=SEED, num_inference_steps=steps, height=SIZE, width=SIZE,
                                    timeout_s=3600)
                seconds = time.perf_counter() - begun
                after = statistics(server)
                result["requests"][f"{steps} step{'s' if steps > 1 else ''}"] = {"client_s": round(seconds, 1), **server_time(before, after)}
                np.save(work / f"served_{dtype}_{steps}steps.npy", response.images)
                log(f"served {SIZE}x{SIZE}, {steps} step(s): {seconds:.1f} s")
            result["rss_after_requests_gib"] = per_model_rss(server.process.pid)
            result["peak_rss_gib"] = gib(sampler.peak())
        finally:
            server.stop()
    return result


def per_model_rss(pid: int) -> dict[str, float]:
    """Resident memory of the server and of each model's stub processes, summed per model."""
    totals: dict[str, int] = {}
    for process in measure.process_tree(pid):
        try:
            command = Path(f"/proc/{process}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        model = next((Path(a.decode()).parent.parent.name for a in command if a.endswith(b"/model.py")), "tritonserver")
        totals[model] = totals.get(model, 0) + measure.status_kib(process, "VmRSS") * 1024
    return {model: gib(value) for model, value in sorted(totals.items())} | {"total": gib(sum(totals.values()))}


def statistics(server) -> dict:
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/stats", headers=server.admin_headers())
    with urllib.request.urlopen(request) as response:
        return {s["name"]: s["inference_stats"] for s in json.load(response)["model_stats"]}


def server_time(before: dict, after: dict) -> dict:
    """Seconds of compute per model for the request (the scheduler's includes its UNet calls)."""
    return {f"{model}_s": round((after[model]["compute_infer"]["ns"] - before[model]["compute_infer"]["ns"]) / 1e9, 2)
            for model in after if model != "ensemble_sdxl"} | {
        "server_s": round((after["ensemble_sdxl"]["success"]["ns"] - before["ensemble_sdxl"]["success"]["ns"]) / 1e9, 1)}


def stage_reference(work: Path, dtype: str) -> dict:
    out = work / f"reference_{dtype}.npy"
    run = measure.run([PY, "-m", "benchmarks.scale", "reference-run", str(work / "sdxl"), str(out), dtype],
                      env=environment(), phase_pattern=r"\[reference\] (\w+)", log_path=work / "reference.log")
    result = run.as_dict()
    served = work / f"served_{dtype}_4steps.npy"
    if run.returncode == 0 and served.exists():
        difference = np.abs(np.load(served).astype(int) - np.load(out).astype(int))
        result["pixels"] = {"max": int(difference.max()), "mean": round(float(difference.mean()), 4),
                            "share_differing": round(float((difference > 0).mean()), 4)}
    return result


def reference_run(model: Path, out: Path, dtype: str) -> None:
    """diffusers' SDXL pipeline + LCMScheduler, the same call as tests/reference.py, one component at
    a time: the text encoders encode, then the UNet denoises to latents, then the VAE decodes."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    from export.sources import LoraSpec, Sources, load_pipeline

    sources = Sources(str(model), (LoraSpec(str(model / "lora")),), str(model / "alt_vae"))

    def pipeline(components):
        loaded = load_pipeline(sources, dtype, components=components).pipe
        parts = {**loaded.components, "scheduler": LCMScheduler.from_config(loaded.scheduler.config)}
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    with torch.no_grad():
        print("[reference] text_encoders", file=sys.stderr, flush=True)
        embeds, _, pooled, _ = pipeline(("text_encoder", "text_encoder_2")).encode_prompt(PROMPT, do_classifier_free_guidance=False)
        print("[reference] unet", file=sys.stderr, flush=True)
        latents = pipeline(("unet",))(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=4, guidance_scale=1.0,
                                      height=SIZE, width=SIZE, generator=[torch.Generator("cpu").manual_seed(SEED)],
                                      output_type="latent").images
        print("[reference] vae", file=sys.stderr, flush=True)
        pipe = pipeline(("vae",))
        image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="np")
    np.save(out, (image * 255).round().astype(np.uint8))


# --- report ------------------------------------------------------------------------------------


def write_markdown(results: dict, path: Path) -> None:
    lines = [f"# Full-size SDXL on a CPU machine ({results['machine']})", "",
             f"Command: `{results['command']}` ({results['date']}). Random weights with SDXL base 1.0's exact architecture; "
             f"every stage in its own process. Peak memory: the kernel's high-water mark of the stage's process "
             f"(`/usr/bin/time -v`'s figure) and the sampled sum over its process tree; the bound is {MEMORY_LIMIT_GIB} GiB.", ""]
    stages = results["stages"]
    lines += ["| stage | time | peak RSS (process) | peak RSS (tree, sampled) | within bound |", "|---|---|---|---|---|"]
    for name in ("random", "onnx-fp16", "onnx-fp32", "engines"):
        if name in stages:
            s = stages[name]
            peak = max(s["max_rss_gib"], s["sampled_peak_gib"])
            lines.append(f"| {name} | {s['seconds']:.0f} s | {s['max_rss_gib']} GiB | {s['sampled_peak_gib']} GiB | "
                         f"{'yes' if peak < MEMORY_LIMIT_GIB and s['returncode'] == 0 else 'NO'} |")
    if "serve" in stages:
        s = stages["serve"]
        lines.append(f"| serve ({s['dtype']}, start + 2 requests) | {s['ready_s']:.0f} s to ready | | {s['peak_rss_gib']} GiB | "
                     f"{'yes' if s['peak_rss_gib'] < MEMORY_LIMIT_GIB else 'NO'} |")
    if "reference" in stages:
        s = stages["reference"]
        lines.append(f"| diffusers reference (fp32) | {s['seconds']:.0f} s | {s['max_rss_gib']} GiB | {s['sampled_peak_gib']} GiB | "
                     f"{'yes' if max(s['max_rss_gib'], s['sampled_peak_gib']) < MEMORY_LIMIT_GIB else 'NO'} |")
    for name in ("random", "onnx-fp16", "onnx-fp32", "engines"):
        if name in stages and stages[name].get("phases"):
            lines += ["", f"**{name}** per phase: " + ", ".join(
                f"{p['name']} {p['seconds']:.0f} s / {p['peak_rss_gib']} GiB" for p in stages[name]["phases"])]
            if "sizes_mb" in stages[name]:
                lines.append(f"files (MB): {json.dumps(stages[name]['sizes_mb'])}")
            if "configs_agree" in stages[name]:
                lines.append(f"graphs (loaded without weights) against the configs: {json.dumps(stages[name]['configs_agree'])}")
            if stages[name].get("reason"):
                lines.append(f"reason: {stages[name]['reason']}")
    if "ort" in stages:
        lines += ["", f"## ONNX Runtime on the CPU, one network at a time, {SIZE}x{SIZE} batch 1", "",
                  "| network | dtype | session load | one run | resident after load | peak RSS |", "|---|---|---|---|---|---|"]
        for key, r in stages["ort"].items():
            network, dtype = key.split()
            lines.append(f"| {network} | {dtype} | {r.get('load_s', '-')} s | {r.get('run_s', '-')} s | {r.get('loaded_rss_gib', '-')} GiB | "
                         f"{r['max_rss_gib']} GiB |")
    if "serve" in stages:
        s = stages["serve"]
        lines += ["", f"## Served, CPU variant, {s['dtype']}, {SIZE}x{SIZE}, one image, no CFG", "",
                  f"Ready after {s['ready_s']} s. Resident memory per model after start: {json.dumps(s['rss_after_start_gib'])}; "
                  f"after the requests: {json.dumps(s['rss_after_requests_gib'])}.", "",
                  "| request | client | server | tokenizer | text_encoder | scheduler (incl. UNet calls) | unet | vae_decoder |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in s["requests"].items():
            lines.append(f"| {name} | {r['client_s']} s | {r['server_s']} s | {r['tokenizer_s']} s | {r['text_encoder_s']} s | "
                         f"{r['scheduler_s']} s | {r['unet_s']} s | {r['vae_decoder_s']} s |")
    if "reference" in stages and "pixels" in stages["reference"]:
        p = stages["reference"]["pixels"]
        lines += ["", f"## Served image against diffusers ({SIZE}x{SIZE}, 4 steps, seed {SEED}, fp32)", "",
                  f"Pixel difference: max {p['max']} levels, mean {p['mean']}, {p['share_differing']:.2%} of values differ "
                  "(the serving tests' fp32 bound on the tiny model: max 1, mean 0.01)."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ort-run"]:
        ort_run(Path(argv[1]), argv[2], argv[3])
        return 0
    if argv[:1] == ["reference-run"]:
        reference_run(Path(argv[1]), Path(argv[2]), argv[3])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    previous = (measure.existing_results(args.out.with_suffix(".json"), log) or {}) if args.skip else {}
    stages = dict(previous.get("stages", {}))
    command = measure.results_env(args.out == parser.get_default("out")) + shlex.join(
        ["python", "-m", "benchmarks.scale", *argv])
    runners = {
        "random": lambda: stage_random(args.work),
        "onnx-fp16": lambda: stage_onnx(args.work, "fp16", args.skeletons),
        "onnx-fp32": lambda: stage_onnx(args.work, "fp32"),
        "engines": lambda: stage_engines(args.work),
        "ort": lambda: stage_ort(args.work),
        "serve": lambda: stage_serve(args.work, CPU_DTYPE),
        "reference": lambda: stage_reference(args.work, CPU_DTYPE),
    }
    for name in STAGES:
        if name in args.skip:
            continue
        log(f"stage {name} ...")
        stages[name] = runners[name]()
        save(args, stages, command)
    log(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = measure.bench_parser("scale", __doc__, "scale_cpu")
    parser.add_argument("--work", type=Path, default=layout.REPO_ROOT / "build" / "scale", help="where the GBs go (about 35 GB)")
    parser.add_argument("--skip", nargs="*", choices=STAGES, default=[],
                        help="stages to leave out (their inputs must exist; their figures come from OUT.json, else "
                             "from the committed benchmarks/results/scale_cpu.json)")
    parser.add_argument("--skeletons", type=Path, metavar="DIR",
                        help="where the fp16 graphs without weights go (default: WORK/sdxl_graphs; "
                             f"{SKELETONS.relative_to(layout.REPO_ROOT)} refreshes the tests' copies)")
    return parser


def save(args, stages: dict, command: str) -> None:
    results = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
                   f"{platform.machine()}, no GPU",
        "stages": stages,
    }
    measure.save_results(results, args.out, write_markdown)


if __name__ == "__main__":
    raise SystemExit(main())
