"""What IP-Adapter image prompts cost (docs/ip-adapter.md): counted, at full size, served, and on a GPU.

    python -m benchmarks.ipadapter [--size 512] [--requests 8] [--skip-full] [--skip-served] [--skeletons DIR]
                                   [--out build/results/ipadapter_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results refreshes the committed ones.

1. `flops`: a UNet step at 1024², one row, without and with the IP-Adapter's layers (the plain adapter's 4
   image tokens, Plus's 16; h94's SDXL layout, 70 cross-attentions, random weights from
   export/ip_adapter.py tiny_ip_adapter_state), through export/modules.py UNet as unet_ip is traced; the
   image encoder per image (CLIP ViT-H/14, h94's models/image_encoder architecture, and the plain adapter's
   ImageProjection: the image_encoder graph), and Plus's Resampler at h94's size; counted by PyTorch's
   FlopCounterMode on the meta device.
2. `full` (unless --skip-full): the image encoder (ViT-H/14 + the plain adapter) exported in fp32 and
   fp16, and unet_ip (SDXL base's UNet + the plain adapter's layers) in fp16, from random weights, each
   export in its own process: time and peak memory (the kernel's high-water mark); the image encoder at
   batch 1 in ONNX Runtime (CPU, fp32). Not an fp32 unet_ip: 10.8 GiB of weights, and its export passes
   MEMORY_BOUND_GIB; the step with and without image tokens is measured on the tiny model (section 3), the
   base UNet's full-size step of `make bench-scale` set beside the encoder's. --skeletons DIR: the fp16
   image_encoder and unet_ip kept without their weights in DIR (`--skeletons tests/data/sdxl_graphs`
   refreshes the tests' copies).
3. `served` (unless --skip-served): the tiny pipeline exported with its plain IP-Adapter and image encoder
   (`python -m export tiny`'s ip_adapter/ip-adapter.safetensors and image_encoder/), and once without, on
   real tritonservers (CPU variant, fp32, the default configs), closed-loop gRPC clients at concurrency
   1 and 4, `--requests` requests per client, SIZE², 4 steps: images/s and latency with no image prompt,
   with one (a SIZE² image, scale 1, all layers), and a mixed load (every other request with one); plain
   requests on the server exported without an IP-Adapter. Both servers run at once, and the cases take
   turns in rounds of ROUND_REQUESTS requests per client, so that drift on the machine hits them alike.
   Where the time goes: Triton's statistics per model (the image encoder's compute per request, unet_ip's
   per call against unet's), each graph alone in ONNX Runtime (unet, unet_lora, unet_ip with and without
   image tokens, image_encoder), and the loop's CLIP preprocessing of the image prompt.
4. `estimate`: a UNet step with image tokens on an H100/H200 at 1024², from the counted work at the rate
   NVIDIA's published H100 TensorRT UNet reaches, and from the adapter's weights read once a step at the
   GPUs' memory bandwidth; the image encoder per request likewise.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .controlnet import H100_UNET_4_STEPS_S, sample_control
from .measure import bench_parser, closed_loop_clients, counted_tflops, median_seconds, save_run, started_server
from .scale import gib, ort_step_lines
from .throughput import log, tiny_pipeline

STEPS = 4
CONCURRENCIES = (1, 4)
SEED = 90
MEMORY_BOUND_GIB = 14  # the bound every process here keeps under (a 24 GiB machine, the test suite beside it)
# What a request sends: no image prompt, one, or every other request one (-1).
CASES = {"no image prompt": 0, "1 image prompt": 1, "mixed (every other request 1)": -1}
WITHOUT_CASE = "no image prompt, server exported without IP-Adapter"
ROUND_REQUESTS = 2  # requests per client in each round of the cases' turns
SERVED_MODELS = ("image_encoder", "unet", "unet_ip")
PLAIN_FILE, PLUS_FILE = "ip-adapter_sdxl_vit-h.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors"
# NVIDIA's published HBM bandwidths (H100 SXM: HBM3, 3.35 TB/s; H200: HBM3e, 4.8 TB/s).
HBM_TB_S = {"H100": 3.35, "H200": 4.8}
# h94's ip-adapter-plus_sdxl_vit-h Resampler (IPAdapterPlusImageProjection as diffusers' converter builds it).
PLUS_RESAMPLER = dict(embed_dims=1280, output_dims=2048, hidden_dims=1280, depth=4, dim_head=64, heads=20, num_queries=16,
                      ffn_ratio=4)


def release_memory() -> None:
    """Give freed memory back to the OS (glibc keeps it otherwise): the flops section's adapters, about 2 GiB,
    are not held while the full-size exports run beside this process."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def rss_gib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# --- the adapters at SDXL's size -------------------------------------------------------------------


def vit_h_encoder(device: str = "cpu", dtype=None):
    """CLIP ViT-H/14 with projection (h94's models/image_encoder architecture), random init."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from export.ip_adapter import VIT_H_14

    with torch.device(device):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H_14)).eval()
    return encoder if dtype is None else encoder.to(dtype)


def write_adapter_files(work: Path) -> dict[str, Path]:
    """Random plain and Plus IP-Adapters for SDXL base's UNet and ViT-H/14 in h94's flat safetensors layout
    (tiny_ip_adapter_state on the meta UNet: the weights are real), once per run."""
    from safetensors.torch import save_file

    from contract.ip_adapters import PLAIN, PLUS
    from export.ip_adapter import tiny_ip_adapter_state
    from export.sdxl import build_component

    files = {PLAIN: work / PLAIN_FILE, PLUS: work / PLUS_FILE}
    if all(path.exists() for path in files.values()):
        return files
    unet, encoder = build_component("unet", device="meta"), vit_h_encoder("meta")
    for seed, (kind, path) in enumerate(files.items(), SEED):
        state = tiny_ip_adapter_state(unet, encoder, kind, seed)
        save_file(state, str(path))
        log(f"adapters: {kind} IP-Adapter for SDXL ({sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters) "
            f"written to {path.name}")
        del state
        gc.collect()
    return files


# --- 1. flops --------------------------------------------------------------------------------------


def flops(work: Path) -> dict:
    """TFLOP per 1024² step, one row: SDXL's UNet without and with the plain and Plus adapters' layers; the
    image encoder per image; parameters (meta device: the adapters are loaded on the CPU, then moved)."""
    import torch
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from contract.ip_adapters import PLAIN, PLUS
    from contract.networks import SDXL_DIMS, TIME_IDS_DIM
    from export.ip_adapter import load_ip_adapter
    from export.modules import ImageEncoder, UNet
    from export.sdxl import build_component

    files = write_adapter_files(work)
    unet, encoder = build_component("unet", device="meta"), vit_h_encoder("meta")
    adapters = {kind: load_ip_adapter(str(path), unet).to("meta") for kind, path in files.items()}
    gc.collect()
    with torch.device("meta"):
        inputs = (torch.randn(1, 4, 128, 128), torch.tensor([500.0]), torch.randn(1, SDXL_DIMS.seq_len, SDXL_DIMS.text_dim),
                  torch.randn(1, SDXL_DIMS.pooled_dim), torch.randn(1, TIME_IDS_DIM))

        def ip_inputs(adapter):
            return (None, None, None, torch.randn(1, adapter.tokens, SDXL_DIMS.text_dim), torch.ones(1, len(adapter.names)))

        resampler = IPAdapterPlusImageProjection(**PLUS_RESAMPLER).eval()
        hidden = torch.randn(1, (224 // 14) ** 2 + 1, encoder.config.hidden_size)
        cases = (("unet", UNet(unet, lora=False), inputs),
                 *((f"unet_ip, {kind} ({adapters[kind].tokens} tokens)", UNet(unet, lora=False, ip_adapter=adapters[kind]),
                    (*inputs, *ip_inputs(adapters[kind]))) for kind in (PLAIN, PLUS)),
                 ("image_encoder (ViT-H/14 + plain projection)", ImageEncoder(encoder, adapters[PLAIN]),
                  (torch.randn(1, 3, 224, 224),)),
                 ("plus resampler", resampler, (hidden,)))
    counted = counted_tflops(cases, digits=4)
    for name, tflop in counted.items():
        log(f"flops: {name}: {tflop} TFLOP ({'per step at 1024x1024' if 'unet' in name else 'per image'})")
    counted["parameters_m"] = {
        "unet": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        **{f"ip layers, {kind}": round(sum(p.numel() for m in (*a.to_k, *a.to_v) for p in m.parameters()) / 1e6, 1)
           for kind, a in adapters.items()},
        "image encoder (ViT-H/14)": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 1),
        "plain projection": round(sum(p.numel() for p in adapters[PLAIN].projection.parameters()) / 1e6, 1),
        "plus resampler": round(sum(p.numel() for p in resampler.parameters()) / 1e6, 1)}
    counted["ip_layers"] = len(adapters[PLAIN].names)
    log(f"flops: parameters (millions) {counted['parameters_m']}")
    return counted


# --- 2. full size ----------------------------------------------------------------------------------


def export_one(name: str, dtype: str, work: Path) -> None:
    """`export-full NAME DTYPE WORK` (a process of its own: its peak memory is the export's): the image
    encoder (ViT-H/14 + the plain adapter) or unet_ip (SDXL base's UNet + the plain adapter's layers), random
    weights, exported with networks.SDXL_DIMS to WORK/DTYPE/NAME/1/."""
    import torch

    from contract import layout, networks
    from export.ip_adapter import load_ip_adapter
    from export.modules import ImageEncoder, UNet
    from export.onnx_export import export_network
    from export.sdxl import build_component

    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    torch.manual_seed(SEED)
    # The adapter first, fitted to the UNet's config (meta: no memory), in the export's dtype; then the network.
    adapter = load_ip_adapter(str(work / PLAIN_FILE), build_component("unet", device="meta")).to(torch_dtype)
    gc.collect()
    if name == networks.IMAGE_ENCODER.name:
        module = ImageEncoder(vit_h_encoder(dtype=torch_dtype), adapter)
    else:
        module = UNet(build_component("unet", dtype=torch_dtype), ip_adapter=adapter)
    log(f"full size: {name} {dtype} built ({sum(p.numel() for p in module.parameters()) / 1e6:.1f} M parameters), "
        f"process peak {rss_gib()} GiB")
    out = layout.version_dir(work / dtype, name)
    export_network(module.eval(), networks.NETWORKS[name], networks.SDXL_DIMS, dtype, out)
    (out / layout.EXPORT_INFO_FILE).write_text(json.dumps({"dims": networks.SDXL_DIMS.as_dict()}))


def export_full_size(work: Path, skeletons: Path | None) -> dict:
    """The full-size exports, each in its own process: seconds, peak RSS; skeletons of the fp16 graphs."""
    from contract import layout

    from . import measure
    from .scale import environment, keep_skeleton, sizes_mb

    write_adapter_files(work)
    results = {}
    for name, dtype in (("image_encoder", "fp32"), ("image_encoder", "fp16"), ("unet_ip", "fp16")):
        ran = measure.run([sys.executable, "-m", "benchmarks.ipadapter", "export-full", name, dtype, str(work)], env=environment(),
                          log_path=work / f"export-{name}-{dtype}.log", echo=False)
        result = {"returncode": ran.returncode, "seconds": round(ran.seconds, 1), "peak_rss_gib": gib(ran.max_rss),
                  "sampled_peak_gib": gib(ran.sampled_peak)}
        if ran.returncode:
            result["error"] = ran.log.strip().splitlines()[-3:]
        else:
            out = layout.version_dir(work / dtype, name)
            result["sizes_mb"] = sizes_mb(out, "model.onnx*")
            if skeletons and dtype == "fp16":
                keep_skeleton(out / layout.ONNX_FILE, skeletons / f"{name}.onnx")
                result["initializer_parameters_m"] = round(initializer_count(skeletons / f"{name}.onnx") / 1e6, 1)
                log(f"full size: {name} skeleton written to {skeletons}")
        results[f"export {name} {dtype}"] = result
        log(f"full size: {name} {dtype} exported: {result}")
    return results


def initializer_count(graph: Path) -> int:
    import math

    import onnx

    return sum(math.prod(t.dims) for t in onnx.load(str(graph), load_external_data=False).graph.initializer)


def ort_graph(repository: Path, name: str, size: int, repeats: int) -> None:
    """`ort-graph REPOSITORY NAME SIZE REPEATS` (a process of its own): one network of an fp32 repository in
    ONNX Runtime (CPU), batch 1, its inputs as request_feed makes them: session load, the median of REPEATS
    runs after a warm-up, resident memory after the load."""
    import onnxruntime as ort

    from contract import layout, networks
    from contract.networks import ModelDims
    from serving.ort_session import session_options

    from . import measure

    dims = ModelDims(**json.loads((layout.version_dir(repository, name) / layout.EXPORT_INFO_FILE).read_text())["dims"])
    feed = request_feed(networks.NETWORKS[name], dims, batch=1, size=size)
    path = layout.onnx_path(repository, name)
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), session_options(path), providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    loaded = measure.status_kib(os.getpid(), "VmRSS") * 1024
    run_s = measure.median_seconds(lambda: session.run(None, feed), repeats)
    print(json.dumps({"load_s": round(load_s, 1), "run_ms": round(run_s * 1e3, 1), "repeats": repeats,
                      "loaded_rss_gib": gib(loaded), "input": "pixel_values 224x224, batch 1" if name == "image_encoder"
                      else f"{size}x{size}, batch 1"}))


def request_feed(spec, dims, *, batch: int, size: int, image_tokens: bool = True) -> dict:
    """numpy inputs of `spec` for `batch` rows of a SIZE² request in fp32 as the loops send them: LoRA
    inputs rank 1 of zeros (a request without LoRAs), zero ControlNet residuals, image tokens (random, or
    zeros with zero scales: a row without an image prompt), scale 1.0 on every IP layer."""
    from export.onnx_export import example_inputs

    latent = size // dims.vae_scale_factor
    inputs = example_inputs(spec, dims, "FP32", batch=batch, latent_height=latent, latent_width=latent, lora_rank=1, seed=SEED)
    feed = {key: value.numpy() for key, value in inputs.items()}
    for key in ("lora_down", "lora_up", "control_residuals"):
        if key in feed:
            feed[key][:] = 0
    if "ip_tokens" in feed:
        if image_tokens:
            import numpy as np

            feed["ip_tokens"][:] = np.random.default_rng(SEED).standard_normal(feed["ip_tokens"].shape, dtype=np.float32)
            feed["ip_layer_scales"][:] = 1.0
        else:
            feed["ip_tokens"][:] = 0
            feed["ip_layer_scales"][:] = 0
    return feed


def full(work: Path, skeletons: Path | None) -> dict:
    """The full-size exports and the image encoder's step in ONNX Runtime, each in its own process."""
    from . import measure
    from .scale import committed_unet_step, environment

    results = export_full_size(work, skeletons)
    if results["export image_encoder fp32"]["returncode"] == 0:
        ran = measure.run([sys.executable, "-m", "benchmarks.ipadapter", "ort-graph", str(work / "fp32"), "image_encoder", "224", "5"],
                          env=environment(), log_path=work / "ort-image-encoder.log", echo=False)
        results["ort image_encoder fp32"] = {**(json.loads(ran.log.strip().splitlines()[-1]) if ran.returncode == 0
                                               else {"error": ran.log.strip().splitlines()[-3:]}), "max_rss_gib": gib(ran.max_rss)}
        log(f"full size: image encoder in ONNX Runtime: {results['ort image_encoder fp32']}")
    results["ort unet_ip fp32"] = {"measured": False, "reason": (
        f"not run: an fp32 unet_ip holds 10.8 GiB of weights (the UNet's 9.6 and the adapter's 1.3); built from random "
        f"weights it reached 11.3 GiB, and its tracing passed {MEMORY_BOUND_GIB} GiB when tried (stopped there), so neither "
        "its export nor a session of it (about 11 GiB loaded, beside the fp32 unet's 9.9) is run here. The step with and "
        "without image tokens is measured on the tiny model (served section); at full size the adapter's share is the "
        "counted one")}
    if (unet := committed_unet_step()) is not None:
        results["ort unet fp32 (scale_cpu.json)"] = unet
    return results


# --- 3. served -------------------------------------------------------------------------------------


def export_repositories(work: Path) -> tuple[Path, Path]:
    """The tiny pipeline exported with its plain IP-Adapter and image encoder, and without."""
    from contract.configs import CPU_DTYPE
    from export.ip_adapter import IMAGE_ENCODER_SUBFOLDER, IP_ADAPTER_SUBFOLDER, PLAIN_FILE as TINY_PLAIN
    from export.onnx_export import export_pipeline
    from export.sources import LoraSpec, Sources

    tiny = tiny_pipeline(work)
    repositories = {}
    for name, ip in (("with-ip-adapter", True), ("without", False)):
        extra = {"ip_adapter": str(tiny / IP_ADAPTER_SUBFOLDER / TINY_PLAIN), "image_encoder": str(tiny / IMAGE_ENCODER_SUBFOLDER)} if ip else {}
        repositories[name] = work / f"repository-{name}"
        export_pipeline(Sources(str(tiny), (LoraSpec(str(tiny / "lora")),), str(tiny / "alt_vae"), **extra), repositories[name], CPU_DTYPE)
    return repositories["with-ip-adapter"], repositories["without"]


def ip_request_inputs(image) -> list:
    """ip_adapter_image (UINT8 [H, W, 3]), ip_adapter_scale (FP32 [1]) and ip_adapter_layers (BYTES [1])."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    arrays = {"ip_adapter_image": ("UINT8", np.ascontiguousarray(image, dtype=np.uint8)),
              "ip_adapter_scale": ("FP32", np.array([1.0], dtype=np.float32)),
              "ip_adapter_layers": ("BYTES", np.array([b"all"], dtype=np.object_))}
    tensors = []
    for name, (triton_dtype, array) in arrays.items():
        tensors.append(grpcclient.InferInput(name, list(array.shape), triton_dtype))
        tensors[-1].set_data_from_numpy(array)
    return tensors


def send(server, size: int, i: int, image) -> None:
    """One request to ensemble_sdxl over gRPC (a connection of its own, as client.generate makes), with the
    image prompt `image` (None: without); raises the server's error."""
    import tritonclient.grpc as grpcclient

    from client import MODEL, build_inputs

    inputs = build_inputs("grpc", f"a house {i}", seed=i, num_inference_steps=STEPS, height=size, width=size)
    if image is not None:
        inputs += ip_request_inputs(image)
    connection = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        result = connection.infer(MODEL, inputs, outputs=[grpcclient.InferRequestedOutput("images")], client_timeout=600)
    finally:
        connection.close()
    if result.as_numpy("images").shape != (1, size, size, 3):
        raise RuntimeError(f"images {result.as_numpy('images').shape}, expected (1, {size}, {size}, 3)")


def closed_loop(server, size: int, concurrency: int, requests: int, image_of, offset: int = 0) -> tuple[list[tuple[bool, float]], float]:
    """`concurrency` clients, each sending `requests` requests one after another: (with an image prompt,
    seconds) of every request, and the wall time. `image_of(i)`: the i-th request's image prompt or None
    (i from `offset`: each client's requests are consecutive)."""
    def one(i: int) -> bool:
        image = image_of(i)
        send(server, size, i, image)
        return image is not None

    return closed_loop_clients(concurrency, requests, one, offset)


def model_seconds(before: dict, after: dict, model: str) -> tuple[float, int, int]:
    """(compute_infer seconds, successful calls, executions) of `model` between two statistics snapshots."""
    if model not in after:
        return 0.0, 0, 0
    b, a = before.get(model), after[model]
    ns = a["inference_stats"]["compute_infer"]["ns"] - (b["inference_stats"]["compute_infer"]["ns"] if b else 0)
    calls = a["inference_stats"]["success"]["count"] - (b["inference_stats"]["success"]["count"] if b else 0)
    executions = a["execution_count"] - (b["execution_count"] if b else 0)
    return ns / 1e9, calls, executions


def segment(server, size: int, concurrency: int, requests: int, image_of, offset: int) -> dict:
    """One closed-loop run (closed_loop) and Triton's statistics around it: the requests' (with an image
    prompt, seconds), the wall time, and (compute seconds, calls, executions) per model."""
    from .throughput import statistics_snapshot

    before = statistics_snapshot(server)
    results, wall = closed_loop(server, size, concurrency, requests, image_of, offset)
    after = statistics_snapshot(server)
    return {"results": results, "wall": wall, "models": {model: model_seconds(before, after, model) for model in SERVED_MODELS}}


def load_row(case: str, concurrency: int, segments: list[dict]) -> dict:
    """A case's row from its segments (the rounds it ran in)."""
    results = [result for part in segments for result in part["results"]]
    wall = sum(part["wall"] for part in segments)
    latencies = sorted(seconds for _, seconds in results)
    plain = [seconds for with_image, seconds in results if not with_image]
    row = {"case": case, "concurrency": concurrency, "requests": len(results),
           "image_prompts": sum(1 for with_image, _ in results if with_image),
           "images_per_s": round(len(results) / wall, 3), "p50_s": round(statistics.median(latencies), 3),
           "p95_s": round(latencies[max(0, round(0.95 * len(latencies)) - 1)], 3),
           "plain_p50_s": round(statistics.median(plain), 3) if plain else None}
    for model in SERVED_MODELS:
        seconds, calls, executions = (sum(part["models"][model][k] for part in segments) for k in range(3))
        row[f"{model}_calls"], row[f"{model}_executions"] = calls, executions
        row[f"{model}_ms_per_call"] = round(seconds / calls * 1e3, 2) if calls else None
    return row


def graph_steps(repository: Path, size: int, repeats: int = 9) -> list[dict]:
    """Each graph a request's step runs, one call in ONNX Runtime (CPU, fp32) at SIZE², batch 1 and 2 (CFG),
    median of `repeats` after a warm-up, the graphs taking turns (their sessions' threads not spinning between
    runs); unet_lora beside them (what unet_ip adds on top of the LoRA inputs it also takes); the image encoder
    at the same batches."""
    import onnxruntime as ort

    from contract import layout, networks
    from contract.configs import repository_export

    _, dims = repository_export(repository)
    graphs = {"unet": ("unet", {}), "unet_lora, rank-1 zero LoRA": ("unet_lora", {}),
              "unet_ip, image tokens": ("unet_ip", {"image_tokens": True}),
              "unet_ip, zero tokens and scales": ("unet_ip", {"image_tokens": False}), "image_encoder": ("image_encoder", {})}
    # Without spinning: a session's threads that spin on after its run would take the cores from the next one's.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {model: ort.InferenceSession(str(layout.onnx_path(repository, model)), options, providers=["CPUExecutionProvider"])
                for model in {model for model, _ in graphs.values()}}
    rows = []
    for batch in (1, 2):
        feeds, times = {}, {name: [] for name in graphs}
        for name, (model, options) in graphs.items():
            feeds[name] = request_feed(networks.NETWORKS[model], dims, batch=batch, size=size, **options)
            sessions[model].run(None, feeds[name])  # warm-up
        for _ in range(repeats):
            for name, (model, _) in graphs.items():
                start = time.perf_counter()
                sessions[model].run(None, feeds[name])
                times[name].append(time.perf_counter() - start)
        for name in graphs:
            rows.append({"graph": name, "batch": batch, "ms": round(statistics.median(times[name]) * 1e3, 2)})
            log(f"graph step: {rows[-1]}")
    return rows


def preprocessing_ms(repository: Path, image, repeats: int = 20) -> float:
    """The loop's CLIP preprocessing of one image prompt (serving/ip_adapters.py), median ms."""
    from serving.ip_adapters import ServedIPAdapter

    served = ServedIPAdapter.load(repository)
    return round(median_seconds(lambda: served.pixel_values(image), repeats) * 1e3, 2)


def first_image_prompt(server, size: int, image, wait_s: float, retry_s: float) -> dict:
    """One request with an image prompt, retried every `retry_s` s for up to `wait_s` s while it fails (the
    serving side of image prompts may still be landing): the attempts and the last error."""
    from client import ClientError
    from tritonclient.utils import InferenceServerException

    start, attempts = time.monotonic(), 0
    while True:
        attempts += 1
        try:
            send(server, size, 0, image)
            return {"attempts": attempts, "error": None}
        except (ClientError, InferenceServerException, RuntimeError) as error:
            message = error.message() if isinstance(error, InferenceServerException) else str(error)
            log(f"served: a request with an image prompt failed (attempt {attempts}): {message}")
            if time.monotonic() - start + retry_s > wait_s:
                return {"attempts": attempts, "error": message}
            time.sleep(retry_s)


def served(work: Path, size: int, requests: int, wait_s: float) -> dict:
    """The served section; on a failure the servers' logs are kept in build/ipadapter-failed/ (the work
    directory goes with the run)."""
    try:
        return served_rows(work, size, requests, wait_s)
    except Exception:
        import shutil

        from contract.layout import REPO_ROOT

        kept = REPO_ROOT / "build" / "ipadapter-failed"
        kept.mkdir(parents=True, exist_ok=True)
        for log_file in work.glob("tritonserver-*.log"):
            shutil.copy2(log_file, kept / log_file.name)
        log(f"served: failed; the servers' logs are in {kept}")
        raise


def served_rows(work: Path, size: int, requests: int, wait_s: float) -> dict:
    import numpy as np

    from . import measure

    load_before = [round(value, 2) for value in os.getloadavg()]
    with_ip, without = export_repositories(work)
    image = sample_control(size, SEED)  # a smooth picture with edges, uint8 [SIZE, SIZE, 3]
    noise = np.random.default_rng(SEED).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = ((image.astype(np.uint16) + noise) // 2).astype(np.uint8)
    result = {"graph_steps": graph_steps(with_ip, size), "preprocessing_ms": preprocessing_ms(with_ip, image)}
    log(f"served: the loop's CLIP preprocessing of a {size}x{size} image prompt: {result['preprocessing_ms']} ms")
    rows = []
    # Both servers up at once, the cases taking turns in rounds of ROUND_REQUESTS requests per client: drift
    # on the machine (a test suite beside the run) hits every case alike.
    with started_server(with_ip, work / "tritonserver-ip.log") as server, \
            started_server(without, work / "tritonserver-plain.log") as plain_server:
        for warmed in (server, plain_server):
            closed_loop(warmed, size, 1, 1, lambda i: None)  # warm-up: every graph's first run at this size
        first = first_image_prompt(server, size, image, wait_s, retry_s=120)
        result["first_image_prompt"] = first
        if first["error"] is not None:
            result["error"] = first["error"]
            return {**result, "rows": rows}
        result["server_rss_gib"] = {"with IP-Adapter": gib(measure.tree_rss_bytes(server.process.pid)),
                                    "without": gib(measure.tree_rss_bytes(plain_server.process.pid))}
        log(f"served: resident memory of each server (process tree): {result['server_rss_gib']}")
        cases = [(case, server, kind) for case, kind in CASES.items()] + [(WITHOUT_CASE, plain_server, 0)]
        rounds = max(1, requests // ROUND_REQUESTS)
        for concurrency in CONCURRENCIES:
            segments = {case: [] for case, _, _ in cases}
            for index in range(rounds):
                for case, served_by, kind in cases:
                    def image_of(i, kind=kind):
                        return image if kind == 1 or (kind == -1 and i % 2) else None
                    count = ROUND_REQUESTS if index < rounds - 1 else requests - ROUND_REQUESTS * (rounds - 1)
                    segments[case].append(segment(served_by, size, concurrency, count, image_of,
                                                  offset=index * concurrency * ROUND_REQUESTS))
                log(f"served: concurrency {concurrency}, round {index + 1}/{rounds} done")
            for case, _, _ in cases:
                rows.append(load_row(case, concurrency, segments[case]))
                log(f"served: {rows[-1]}")
    rows.sort(key=lambda row: ([case for case, _, _ in cases].index(row["case"]), row["concurrency"]))
    # Other work on the machine (a test suite beside the run) slows every row alike, not the ratios: said in the results.
    return {**result, "rows": rows, "load_average": {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]}}


# --- 4. estimate -----------------------------------------------------------------------------------


def estimate(counted: dict) -> dict:
    """A UNet step at 1024² with the plain adapter's and Plus's image tokens on an H100 (an H200 has its
    compute), and the image encoder per request: the counted work at the rate NVIDIA's published TensorRT
    UNet reaches; and the adapter's layer weights (fp16) read once a step at each GPU's memory bandwidth."""
    unet_step_s = H100_UNET_4_STEPS_S / 4
    rate = counted["unet"] / unet_step_s  # TFLOP/s the published UNet step reaches
    plain, plus = counted["unet_ip, plain (4 tokens)"], counted["unet_ip, plus (16 tokens)"]
    encoder = counted["image_encoder (ViT-H/14 + plain projection)"]
    params = counted["parameters_m"]
    ip_bytes = params["ip layers, plain"] * 1e6 * 2  # fp16
    encoder_bytes = (params["image encoder (ViT-H/14)"] + params["plain projection"]) * 1e6 * 2
    return {"h100_unet_step_ms": round(unet_step_s * 1e3, 1), "effective_tflops": round(rate, 1),
            "plain_extra_tflop": round(plain - counted["unet"], 4), "plus_extra_tflop": round(plus - counted["unet"], 4),
            "plain_counted_ratio": round(plain / counted["unet"], 5), "plus_counted_ratio": round(plus / counted["unet"], 5),
            "h100_plain_step_ms_counted": round(plain / rate * 1e3, 2), "h100_plus_step_ms_counted": round(plus / rate * 1e3, 2),
            "ip_weights_gb_fp16": round(ip_bytes / 1e9, 2),
            **{f"{gpu.lower()}_ip_weights_read_ms": round(ip_bytes / (tb_s * 1e12) * 1e3, 3) for gpu, tb_s in HBM_TB_S.items()},
            "h100_encoder_ms_counted": round(encoder / rate * 1e3, 2),
            **{f"{gpu.lower()}_encoder_weights_read_ms": round(encoder_bytes / (tb_s * 1e12) * 1e3, 3) for gpu, tb_s in HBM_TB_S.items()},
            "h100_4_steps_plain_ms": round(4 * (plain / rate + ip_bytes / (HBM_TB_S["H100"] * 1e12)) * 1e3 + encoder / rate * 1e3, 1),
            "h100_4_steps_without_ms": round(4 * unet_step_s * 1e3, 1)}


# --- results ---------------------------------------------------------------------------------------


def write_table(results: dict, path: Path) -> None:
    size = results["size"]
    lines = ["# IP-Adapter image prompts: what they cost", "",
             f"`{results['command']}`, {results['machine']}, {results['minutes']:.1f} min. See benchmarks/ipadapter.py.", ""]
    counted = results["flops"]
    params = counted["parameters_m"]
    lines += ["## Work at 1024x1024, one row (FlopCounterMode, meta device; random weights, h94's SDXL layout)", "",
              "| network | TFLOP | parameters (millions) |", "|---|---|---|",
              f"| UNet step (SDXL base) | {counted['unet']} | {params['unet']} |",
              f"| UNet step with the plain adapter's 4 image tokens ({counted['ip_layers']} IP layers) | "
              f"{counted['unet_ip, plain (4 tokens)']} | {params['unet']} + {params['ip layers, plain']} |",
              f"| UNet step with Plus's 16 image tokens | {counted['unet_ip, plus (16 tokens)']} | "
              f"{params['unet']} + {params['ip layers, plus']} |",
              f"| image encoder per image: CLIP ViT-H/14 + the plain adapter's projection, 224x224 | "
              f"{counted['image_encoder (ViT-H/14 + plain projection)']} | {params['image encoder (ViT-H/14)']} + "
              f"{params['plain projection']} |",
              f"| Plus's Resampler per image (h94's size, on ViT-H/14's penultimate hidden states) | "
              f"{counted['plus resampler']} | {params['plus resampler']} |", "",
              f"The image tokens add {results['estimate']['plain_extra_tflop']} TFLOP to a step (plain; "
              f"{results['estimate']['plus_extra_tflop']} with Plus): {100 * (results['estimate']['plain_counted_ratio'] - 1):.2f}% "
              f"({100 * (results['estimate']['plus_counted_ratio'] - 1):.2f}%). Their keys and values are 4 (16) rows against "
              "the 77 of the text; what they cost is the 2 x 70 projection matrices' weights, read every step."]
    if "full" in results:
        full_ = results["full"]
        lines += ["", "## Full size on this CPU (random weights, networks.SDXL_DIMS)", "",
                  "Each export in its own process; peak: the kernel's high-water mark of that process.", "",
                  "| export | time | peak RSS | files |", "|---|---|---|---|"]
        for key, value in full_.items():
            if key.startswith("export "):
                files = ", ".join(f"{name} {mb:,.0f} MB" for name, mb in value.get("sizes_mb", {}).items()) or "; ".join(value.get("error", []))
                lines.append(f"| {key[len('export '):]} | {value['seconds']} s | {value['peak_rss_gib']} GiB | {files} |")
        skeleton = {key[len("export "):]: value["initializer_parameters_m"] for key, value in full_.items()
                    if "initializer_parameters_m" in value}
        if skeleton:
            lines.append("\nWeights in the fp16 graphs (initializers, millions): "
                         + ", ".join(f"{name} {count:,}" for name, count in skeleton.items()) + ".")
        lines.append("\nThe image encoder's module holds the whole adapter, as the export's does (its 70 layers' 341 M "
                     "weights are not in the graph). Its fp16 graph, under the 2 GB external-data threshold, is held and "
                     "serialized in memory as one file (the exporter writes the fp32 one's weights straight to files): the "
                     "likely cause of its higher peak.")
        encoder = full_.get("ort image_encoder fp32", {})
        lines += ort_step_lines("### ONNX Runtime (CPU, fp32), batch 1 (the UNet at 512x512)", "image_encoder, 224x224",
                                {"load_s": encoder.get("load_s"), "run_s": round(encoder["run_ms"] / 1e3, 3) if "run_ms" in encoder else None,
                                 "loaded_rss_gib": encoder.get("loaded_rss_gib"), "max_rss_gib": encoder.get("max_rss_gib")},
                                full_.get("ort unet fp32 (scale_cpu.json)"))
        lines += ["", f"unet_ip fp32 at full size: {full_['ort unet_ip fp32']['reason']}."]
    if "served" in results:
        served_ = results["served"]
        lines += ["", f"## Served, tiny model, CPU variant (fp32), {size}x{size}, {STEPS} steps, closed-loop gRPC clients", ""]
        if served_.get("load_average"):
            load = served_["load_average"]
            lines += [f"Load average (1, 5, 15 min) before the section: {', '.join(map(str, load['before']))}; after: "
                      f"{', '.join(map(str, load['after']))} ({os.cpu_count()} cores; the section itself keeps about "
                      "2 busy at concurrency 4).", ""]
        if served_.get("error"):
            lines += [f"Not measured: a request with an image prompt failed after {served_['first_image_prompt']['attempts']} "
                      f"attempts: `{served_['error']}`."]
        else:
            lines += [f"Image prompt: a {size}x{size} RGB image, ip_adapter_scale 1.0, ip_adapter_layers all. Both servers "
                      f"run at once; at each concurrency the cases take turns in rounds of {ROUND_REQUESTS} requests per client "
                      "(drift on the machine hits them alike; images/s counts each round's ramp-up and drain). Triton's "
                      "statistics: compute per call of each model (the image encoder is called once per request with an "
                      "image prompt).", "",
                      "| case | concurrency | requests | images/s | p50 (s) | p95 (s) | without image prompt, p50 (s) | "
                      "image_encoder ms/call | unet ms/call | unet_ip ms/call |", "|---|---|---|---|---|---|---|---|---|---|"]
            for row in served_["rows"]:
                cells = [row["case"], row["concurrency"], row["requests"], row["images_per_s"], row["p50_s"], row["p95_s"],
                         row["plain_p50_s"], row["image_encoder_ms_per_call"], row["unet_ms_per_call"], row["unet_ip_ms_per_call"]]
                lines.append("| " + " | ".join("-" if cell is None else str(cell) for cell in cells) + " |")
        if served_.get("server_rss_gib"):
            lines += ["", "Resident memory of each server after its warm-up (process tree): "
                      + ", ".join(f"{name} {value} GiB" for name, value in served_["server_rss_gib"].items()) + "."]
        lines += ["", f"### Where a step goes: each graph once in ONNX Runtime (CPU, fp32, {size}x{size}, median of 9, taking "
                  "turns, intra-op threads not spinning between runs; unet_lora and unet_ip with rank-1 zero LoRA weights, "
                  "unet_ip with zero ControlNet residuals: a request with an image prompt alone)", "", "| graph | batch | ms |", "|---|---|---|"]
        lines += [f"| {row['graph']} | {row['batch']} | {row['ms']} |" for row in served_["graph_steps"]]
        steps = {(row["graph"], row["batch"]): row["ms"] for row in served_["graph_steps"]}
        if ("unet_lora, rank-1 zero LoRA", 1) in steps:
            lines += ["", "unet_ip against unet: " + "; ".join(
                f"batch {batch}: {steps[('unet_ip, image tokens', batch)] / steps[('unet', batch)]:.2f}x, of which the LoRA "
                f"inputs it also takes (unet_lora) {steps[('unet_lora, rank-1 zero LoRA', batch)] / steps[('unet', batch)]:.2f}x "
                f"and the image tokens {steps[('unet_ip, image tokens', batch)] / steps[('unet_lora, rank-1 zero LoRA', batch)]:.2f}x "
                f"more" for batch in (1, 2)) + ". On the tiny model the LoRA branches are a large share of small "
                "convolutions' work; at full size the image tokens' share is the counted one above."]
        lines += ["", f"The loop's CLIP preprocessing of a {size}x{size} image prompt (resize, crop, normalize; "
                  f"serving/ip_adapters.py): {served_['preprocessing_ms']} ms."]
        if served_.get("plain_requests"):
            lines += ["", "A request without image prompt, p50: " + "; ".join(
                f"concurrency {c}: {v['ip_server_s']} s on the server that serves image prompts ({v['ip_server_mixed_s']} s "
                f"among requests with one), {v['server_without_s']} s on the server exported without IP-Adapter"
                for c, v in served_["plain_requests"].items()) + "."]
        if served_.get("encoder_cost"):
            cost = served_["encoder_cost"]
            lines += ["", f"The image prompt's cost per request, concurrency 1: {cost['latency_ms']} ms of latency (p50 with "
                      f"against without); of it the image encoder {cost['server_encoder_ms']} ms (Triton's compute), "
                      f"{cost['ort_encoder_ms']} ms alone in ONNX Runtime; the 4 UNet calls on unet_ip instead of unet "
                      f"{cost['unet_ip_extra_ms']} ms."]
    est = results["estimate"]
    lines += ["", "## Estimate on a GPU, 1024x1024, batch 1 (not measured: no GPU here)", "",
              f"Basis: NVIDIA's published H100 TensorRT UNet step (SDXL + LCM, {est['h100_unet_step_ms']} ms, "
              f"{est['effective_tflops']} TFLOP/s over the counted work). A step with the plain adapter's image tokens, the "
              f"counted work at that rate: {est['h100_plain_step_ms_counted']} ms (Plus: {est['h100_plus_step_ms_counted']} ms). "
              f"The adapter's 140 projections hold {est['ip_weights_gb_fp16']} GB in fp16, read once a step: "
              f"{est['h100_ip_weights_read_ms']} ms at the H100's 3.35 TB/s, {est['h200_ip_weights_read_ms']} ms at the H200's "
              f"4.8 TB/s, a bound the counted figure does not show (the image tokens' keys and values are the same every step; "
              f"the graph recomputes them). The image encoder, once per request: {est['h100_encoder_ms_counted']} ms counted "
              f"(its weights read: {est['h100_encoder_weights_read_ms']} ms on an H100). Four steps with an image prompt: about "
              f"{est['h100_4_steps_plain_ms']} ms of UNet, adapter and encoder work, the counted work and the adapter's weight reads "
              f"taken as not overlapping (without: {est['h100_4_steps_without_ms']} ms). "
              "An H200 has the H100's compute: the same figures, less the weight reads' share."]
    lines.append("")
    path.write_text("\n".join(lines))


def plain_requests(result: dict) -> dict:
    """A request without image prompt, p50 seconds by concurrency: on the server that serves image prompts
    (alone, and among requests with one) against the server exported without IP-Adapter."""
    rows = {(row["case"], row["concurrency"]): row for row in result.get("rows", [])}
    return {str(c): {"ip_server_s": rows[("no image prompt", c)]["p50_s"],
                     "ip_server_mixed_s": rows[("mixed (every other request 1)", c)]["plain_p50_s"],
                     "server_without_s": rows[(WITHOUT_CASE, c)]["p50_s"]}
            for c in CONCURRENCIES if (WITHOUT_CASE, c) in rows}


def encoder_cost(result: dict) -> dict | None:
    """The image prompt's latency at concurrency 1 against the request without, and its parts."""
    rows = {(row["case"], row["concurrency"]): row for row in result.get("rows", [])}
    prompted, plain = rows.get(("1 image prompt", 1)), rows.get(("no image prompt", 1))
    steps = {(row["graph"], row["batch"]): row["ms"] for row in result.get("graph_steps", [])}
    if not prompted or not plain:
        return None
    return {"latency_ms": round((prompted["p50_s"] - plain["p50_s"]) * 1e3, 1),
            "server_encoder_ms": prompted["image_encoder_ms_per_call"], "ort_encoder_ms": steps.get(("image_encoder", 1)),
            "unet_ip_extra_ms": round(STEPS * (prompted["unet_ip_ms_per_call"] - plain["unet_ms_per_call"]), 1)
            if prompted["unet_ip_ms_per_call"] and plain["unet_ms_per_call"] else None}


def build_parser():
    parser = bench_parser("ipadapter", __doc__, "ipadapter_cpu")
    parser.add_argument("--size", type=int, default=512, help="served height and width (default 512)")
    parser.add_argument("--requests", type=int, default=8, help="requests per client and case (default 8)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full-size exports and ONNX Runtime run (about 6 minutes, "
                        "9 GiB)")
    parser.add_argument("--skip-served", action="store_true", help="skip the served tiny model")
    parser.add_argument("--skeletons", type=Path, metavar="DIR", help="keep the skeletons of the fp16 image_encoder and unet_ip in DIR")
    parser.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="retry a failing request with an image prompt for up to SECONDS before giving up (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export-full"]:
        export_one(argv[1], argv[2], Path(argv[3]))
        return 0
    if argv[:1] == ["ort-graph"]:
        ort_graph(Path(argv[1]), argv[2], int(argv[3]), int(argv[4]))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    results = {"size": args.size, "requests_per_client": args.requests}
    with tempfile.TemporaryDirectory(prefix="bench-ipadapter-") as tmp:
        work = Path(tmp)
        results["flops"] = flops(work)
        release_memory()
        if not args.skip_full:
            results["full"] = full(work, args.skeletons)
        if not args.skip_served:
            results["served"] = served(work, args.size, args.requests, args.wait)
            results["served"]["encoder_cost"] = encoder_cost(results["served"])
            results["served"]["plain_requests"] = plain_requests(results["served"])
    results["estimate"] = estimate(results["flops"])
    save_run("ipadapter", argv, started, args, parser, results, write_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
