"""SDXL + LCM on one GPU, component by component: diffusers, this project's loop, and TensorRT.

    python -m benchmarks.gpu [--device cuda|cpu] [--arch sdxl|tiny] [--size 1024] [--steps 4]
                             [--batches 1 4 8] [--repeats 5] [--dtype fp16|fp32] [--out PREFIX]
                             [--work DIR] [--skip-tensorrt] [--unet-precisions fp8 int8]

What it measures, with random full-size weights (SDXL base 1.0's exact configs, built on the device
by export/sdxl.py; speed does not depend on the weights' values), for batch (num_images_per_prompt)
1, 4 and 8, without CFG (guidance 1.0) and with CFG (guidance 1.5 and a negative prompt):
1. `diffusers`: StableDiffusionXLPipeline + LCMScheduler over the components in memory, as users run
   it without this project;
2. `project loop`: what the Triton scheduler model runs (serving/text.py's tokenizing,
   serving/denoise.py's Denoiser + denoise) over export/modules.py's wrappers of the same modules;
3. `project loop, VAE fp32`: the same with the VAE decoder in fp32 (NVIDIA's TensorRT demo keeps the
   SDXL VAE in fp32; in the published H100 figures the VAE is more than half of 234 ms);
4. `tensorrt` and `tensorrt, VAE fp32`: the project loop over TensorRT plans, exported and built by
   export/onnx_export.py and export/engines.py, where the `tensorrt` module is installed (else the
   results say why they are missing);
5. `tensorrt, UNet fp8` and `tensorrt, UNet int8`: the same with the UNet's graph quantized by
   export/quantize.py (Q/DQ, strongly typed plans; calibrated on the device with the LCM loop at
   --size over random embeddings), at batch 1, 4 and 8 like the others (--unet-precisions).
Per setup: text encoders, UNet per step, VAE decode and end-to-end latency (median and p90 over
--repeats runs after 2 warm-up runs), images/s and peak GPU memory; and the pixel difference
between the loops' images (same weights, same seeds), which shows they compute the same thing.
Writes <out>.json (every figure) and <out>.md (tables, against the published reference figures); by
default build/results/gpu_<GPU name>.* (gpu_cpu-smoke.* on the CPU), or under $BENCH_RESULTS when
set; BENCH_RESULTS=benchmarks/results (or --out benchmarks/results/gpu_<GPU name>) refreshes the
committed ones.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from benchmarks.measure import out_help, results_env, results_path
from contract import networks
from contract.layout import REPO_ROOT
from contract.networks import ModelDims, NetworkSpec

WARMUP_RUNS = 2  # the first runs pay for lazy initialization, kernel selection and allocator growth
SEED = 42
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed, digital art"
NEGATIVE_PROMPT = "blurry, low quality, watermark"
GUIDANCE_WITH_CFG = 1.5  # LCM-LoRA works with guidance 1 to 2 (README, "The endpoint")
COMPONENTS = ("text_encoders", "unet", "vae_decode")

# The tensors the loop passes between networks, named by the contract.
PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS = networks.TEXT_ENCODER.output_names
(NOISE_PRED,) = networks.UNET.output_names
(LATENTS,) = networks.VAE_DECODER.input_names
(IMAGES,) = networks.VAE_DECODER.output_names

# /work/shared/DESIGN.md, "Reference figures": NVIDIA/Stability TensorRT, SDXL + LCM, 4 steps, 1024²,
# batch 1, H100 (TensorRT 9.2, Hugging Face card stabilityai/stable-diffusion-xl-1.0-tensorrt).
REFERENCE = {
    "source": "NVIDIA/Stability TensorRT SDXL + LCM, 4 steps, 1024², batch 1, no CFG, H100 (TensorRT 9.2, "
              "VAE in TF32; Hugging Face card stabilityai/stable-diffusion-xl-1.0-tensorrt)",
    "size": 1024,
    "steps": 4,
    "batch": 1,
    "text_encoders_ms": 0.78,
    "unet_ms": 102.8,  # all 4 steps, about 26 ms a step
    "vae_decode_ms": 127.0,
    "end_to_end_ms": 234.2,
}


def log(message: str) -> None:
    print(f"[gpu-bench] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A condition that stops the benchmark with one `error:` line and exit code 2."""


# --- Command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the code path")
    parser.add_argument("--arch", choices=("sdxl", "tiny"), default="sdxl",
                        help="sdxl: SDXL base 1.0's sizes, random weights; tiny: the test pipeline, for smoke runs")
    parser.add_argument("--size", type=int, default=1024, help="image height and width in pixels (a multiple of 64)")
    parser.add_argument("--steps", type=int, default=4, help="LCM denoising steps")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="images per prompt")
    parser.add_argument("--unet-precisions", nargs="+", choices=("fp8", "int8"), default=["fp8", "int8"],
                        help="8-bit UNet plans measured beside the float one (export/quantize.py: calibrated on "
                             f"{GPU_CALIBRATION_PROMPTS} random prompts' embeddings with the LCM loop at --size; default fp8 int8)")
    parser.add_argument("--repeats", type=int, default=5,
                        help=f"timed runs per measurement, after {WARMUP_RUNS} warm-up runs")
    parser.add_argument("--dtype", choices=("fp16", "fp32"),
                        help="text encoders, UNet and VAE (default: fp16 on cuda, fp32 on cpu, where fp16 is "
                             "emulated); the VAE fp32 setups keep their VAE in fp32 anyway")
    parser.add_argument("--out", type=Path, metavar="PREFIX",
                        help=out_help("gpu_<GPU name>", note=", or gpu_cpu-smoke on the CPU"))
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "build" / "gpu-bench",
                        help="where the TensorRT part writes its ONNX graphs and plans (default: build/gpu-bench)")
    parser.add_argument("--skip-tensorrt", action="store_true", help="measure PyTorch only")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 64:
        parser.error(f"--size {args.size}: expected a positive multiple of 64")
    if args.steps < 1 or args.repeats < 1 or min(args.batches) < 1:
        parser.error("--steps, --repeats and --batches take positive integers")
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    return args


def resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("no CUDA GPU visible to PyTorch; run this on a machine with an NVIDIA GPU and PyTorch's "
                         f"CUDA build (torch {torch.__version__} here), or pass --device cpu for a smoke run")
    if importlib.util.find_spec("diffusers") is None:
        raise BenchError("diffusers is not installed; without network, install requirements/gpu-bench.txt's "
                         "wheels: pip install --no-index --find-links build/wheels -r requirements/gpu-bench.txt")
    return torch.device(name)


def default_out(device) -> Path:
    import torch

    name = "cpu-smoke" if device.type == "cpu" else slug(torch.cuda.get_device_name(device))
    return results_path(f"gpu_{name}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def command_line(argv: list[str], default_out: bool = False) -> str:
    """The command that reproduces the run, with the thread count when the environment set it, and
    BENCH_RESULTS when it chose where the results went (`default_out`: no --out given)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = results_env(default_out) + (f"OMP_NUM_THREADS={shlex.quote(threads)} " if threads else "")
    return prefix + "python -m benchmarks.gpu" + (" " + shlex.join(argv) if argv else "")


@contextmanager
def quiet_libraries():
    """Errors only from diffusers and transformers while it runs: their warnings (config keys
    LCMScheduler ignores, optional image processors) would bury the progress lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = [(library, library.get_verbosity()) for library in (diffusers_logging, transformers_logging)]
    for library, _ in levels:
        library.set_verbosity_error()
    try:
        yield
    finally:
        for library, level in levels:
            library.set_verbosity(level)


# --- The weights -----------------------------------------------------------------------------------


@dataclass
class Components:
    """Every module the setups share, on the device; `vae` decodes in the compute dtype, `vae_fp32` in fp32."""

    tokenizer: object
    tokenizer_2: object
    text_encoder: object
    text_encoder_2: object
    unet: object
    vae: object
    vae_fp32: object
    scheduler_config: dict
    dims: ModelDims


def build_components(arch: str, dtype, device) -> Components:
    from export.sdxl import scheduler_config

    modules = (build_sdxl if arch == "sdxl" else build_tiny)(dtype, device)
    from types import SimpleNamespace

    from contract.networks import lora_widths

    dims = ModelDims.from_configs(modules["tokenizer"].model_max_length, modules["text_encoder"].config,
                                  modules["text_encoder_2"].config, modules["unet"].config, modules["vae"].config,
                                  lora_widths=lora_widths(SimpleNamespace(**modules)))
    return Components(**modules, scheduler_config=scheduler_config(), dims=dims)


def build_sdxl(dtype, device) -> dict:
    """SDXL base 1.0's components with random weights, built straight on the device; the fp16 VAE has
    the fp16-fix VAE's config (as production serves it), the fp32 one SDXL's own (as NVIDIA's demo)."""
    import torch

    from export.sdxl import build_component, clip_vocabulary
    from export.tiny import clip_tokenizers

    log("tokenizers: 49,408-token CLIP vocabularies ...")
    tokenizer, tokenizer_2 = clip_tokenizers(*clip_vocabulary())
    modules = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    plan = {
        "text_encoder": ("text_encoder", dtype),
        "text_encoder_2": ("text_encoder_2", dtype),
        "unet": ("unet", dtype),
        "vae": ("alt_vae" if dtype == torch.float16 else "vae", dtype),
        "vae_fp32": ("vae", torch.float32),
    }
    for offset, (key, (name, component_dtype)) in enumerate(plan.items()):
        log(f"{key}: SDXL's {name}, random weights, {str(component_dtype).removeprefix('torch.')} on {device} ...")
        torch.manual_seed(SEED * 100 + offset)  # each component from its own seed: the same weights every run
        modules[key] = build_component(name, dtype=component_dtype, device=device)
    return modules


def build_tiny(dtype, device) -> dict:
    """The tiny test pipeline's components (export/tiny.py), for smoke runs."""
    import torch

    from export.tiny import build_tiny_pipeline, tiny_vae

    pipe = build_tiny_pipeline(seed=0)
    modules = {name: getattr(pipe, name) for name in ("tokenizer", "tokenizer_2")}
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        modules[name] = getattr(pipe, name).to(device=device, dtype=dtype).eval()
    torch.manual_seed(SEED)
    modules["vae_fp32"] = tiny_vae().to(device=device, dtype=torch.float32).eval()
    return modules


# --- Timing ----------------------------------------------------------------------------------------


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timeline:
    """Named spans of one run, timed on the device's clock: CUDA events on a GPU (what the stream
    did between two points, launch gaps included), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []

    def _mark(self):
        import torch

        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def span(self, name: str):
        start = self._mark()
        yield
        self.spans.append((name, start, self._mark()))

    def durations_ms(self) -> dict[str, list[float]]:
        """Each span's duration by name, in call order; call once the device is synchronized."""
        durations: dict[str, list[float]] = {}
        for name, start, end in self.spans:
            elapsed = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            durations.setdefault(name, []).append(elapsed)
        return durations


def timed(function: Callable, timeline: Timeline, name: str) -> Callable:
    def wrapper(*args, **kwargs):
        with timeline.span(name):
            return function(*args, **kwargs)

    return wrapper


@contextmanager
def timed_methods(timeline: Timeline, targets: list[tuple[object, str, str]]):
    """Time the (object, method, span name) calls made by code we do not own (diffusers' pipeline), by
    shadowing the bound methods with instance attributes, removed afterwards."""
    for obj, method, name in targets:
        object.__setattr__(obj, method, timed(getattr(obj, method), timeline, name))
    try:
        yield
    finally:
        for obj, method, _ in targets:
            object.__delattr__(obj, method)


def summarize(values: list[float]) -> dict:
    import numpy as np

    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)), "min": float(min(values)),
            "runs": [round(v, 3) for v in values]}


# --- The requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    negative_prompt: str
    options: object  # serving.endpoint.GenerationOptions

    @property
    def cfg(self) -> bool:
        return self.options.do_classifier_free_guidance

    @property
    def label(self) -> str:
        guidance = f"CFG {self.options.guidance_scale:g}" if self.cfg else "no CFG"
        return f"batch {self.options.num_images_per_prompt}, {guidance}"


def bench_requests(args) -> list[BenchRequest]:
    from serving.endpoint import GenerationOptions

    requests = []
    for batch in args.batches:
        for guidance, negative in ((1.0, ""), (GUIDANCE_WITH_CFG, NEGATIVE_PROMPT)):
            options = GenerationOptions(SEED, args.steps, guidance, args.size, args.size, batch)
            requests.append(BenchRequest(PROMPT, negative, options))
    return requests


# --- The setups: each turns a request into uint8 images [N, H, W, 3] on the device ---------------------


@dataclass
class Setup:
    name: str
    unet_dtype: str
    vae_dtype: str
    generate: Callable[[BenchRequest, Timeline], object]
    description: str


def diffusers_setup(components: Components, dtype_name: str) -> Setup:
    """diffusers' StableDiffusionXLPipeline + LCMScheduler over the same modules."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
        scheduler=LCMScheduler.from_config(components.scheduler_config), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    probes = [(components.text_encoder, "forward", "text_encoders"),
              (components.text_encoder_2, "forward", "text_encoders"),
              (components.unet, "forward", "unet"), (components.vae, "decode", "vae_decode")]

    def generate(request: BenchRequest, timeline: Timeline):
        options = request.options
        with timed_methods(timeline, probes):
            images = pipe(
                request.prompt, negative_prompt=request.negative_prompt or None,
                num_inference_steps=options.num_inference_steps, guidance_scale=options.guidance_scale,
                height=options.height, width=options.width, num_images_per_prompt=options.num_images_per_prompt,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in options.seeds],
                output_type="pt",  # stays on the device, as the project decoder's images; PIL is left out of both
            ).images
        # What the project's decoder does after denormalizing: fp32 * 255, round half to even, NHWC uint8.
        return (images.float() * 255).round().permute(0, 2, 3, 1).to(torch.uint8)

    return Setup("diffusers", dtype_name, dtype_name, generate,
                 "diffusers' StableDiffusionXLPipeline + LCMScheduler over the components in memory (output_type='pt')")


class TorchNetwork:
    """A module of export/modules.py called with, and returning, tensors named as contract/networks.py."""

    def __init__(self, module, spec: NetworkSpec):
        self.module, self.spec = module, spec

    def __call__(self, inputs: dict) -> dict:
        dtype = next(self.module.parameters()).dtype
        feeds = {name: inputs[name].to(dtype) if name.startswith("lora_") else inputs[name] for name in self.spec.input_names}
        outputs = self.module(**feeds)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.spec.output_names, outputs, strict=True))


class ProjectLoop:
    """The Triton models' path in-process: tokenizer (serving/text.py), text_encoder, the scheduler's
    Denoiser + denoise (serving/denoise.py) calling unet, then vae_decoder. The networks are callables
    over named tensors, so PyTorch modules and TensorRT engines run in the same loop."""

    def __init__(self, tokenizer, text_encoder, unet, vae_decoder, components: Components, device):
        self.tokenizer, self.text_encoder, self.unet, self.vae_decoder = tokenizer, text_encoder, unet, vae_decoder
        self.scheduler_config, self.dims, self.device = components.scheduler_config, components.dims, device

    def __call__(self, request: BenchRequest, timeline: Timeline):
        import torch
        from diffusers import LCMScheduler

        from serving.denoise import Denoiser, denoise
        from serving.text import texts_to_encode

        ids = self.tokenizer(texts_to_encode(request.prompt, request.negative_prompt, request.cfg))
        ids = {name: torch.from_numpy(value).to(self.device) for name, value in ids.items()}
        rows = next(iter(ids.values())).shape[0]
        # No per-request LoRA: zeros of rank 1, what the served graphs get for such a request.
        text_lora = self.no_lora(rows, self.dims.text_lora_in, self.dims.text_lora_out)
        with timeline.span("text_encoders"):
            text = self.text_encoder({**ids, **text_lora})
        scheduler = LCMScheduler.from_config(self.scheduler_config)  # one per request, as the scheduler model does
        denoiser = Denoiser(request.options, text[PROMPT_EMBEDS], text[POOLED_PROMPT_EMBEDS], scheduler,
                            latent_channels=self.dims.latent_channels, vae_scale_factor=self.dims.vae_scale_factor)

        def unet(inputs):
            with timeline.span("unet"):
                return self.unet(inputs)[NOISE_PRED]

        latents = denoise(unet, denoiser)
        with timeline.span("vae_decode"):
            return self.vae_decoder({LATENTS: latents})[IMAGES]

    def no_lora(self, rows: int, width_in: int, width_out: int) -> dict:
        import torch

        dtype = torch.float32  # cast by each network to its own dtype
        return {"lora_down": torch.zeros(rows, 1, width_in, dtype=dtype, device=self.device),
                "lora_up": torch.zeros(rows, width_out, 1, dtype=dtype, device=self.device)}


@contextmanager
def prompt_tokenizer(components: Components):
    """serving/text.py's PromptTokenizer, loaded as the tokenizer model loads it: from the files the
    exporter writes (tokenizer files only, a few MB, in a temporary directory)."""
    from contract.layout import TOKENIZER_DIRS
    from serving.text import PromptTokenizer

    with tempfile.TemporaryDirectory(prefix="gpu-bench-tokenizers-") as directory:
        for which in TOKENIZER_DIRS:
            getattr(components, which).save_pretrained(Path(directory) / which)
        yield PromptTokenizer(Path(directory))


def project_setups(components: Components, tokenizer, dtype_name: str, device) -> list[Setup]:
    from export.modules import TextEncoders, UNet, VaeDecoder

    # TextEncoders switches the encoders to eager attention (the form the graph is exported in).
    encoders = TextEncoders(components.text_encoder, components.text_encoder_2).eval()
    text_encoder = TorchNetwork(encoders, networks.TEXT_ENCODER)
    unet = TorchNetwork(UNet(components.unet).eval(), networks.UNET)
    description = "serving/text.py + serving/denoise.py (Denoiser, denoise) over export/modules.py's wrappers"
    setups = []
    for name, vae, vae_dtype in (("project loop", components.vae, dtype_name),
                                 ("project loop, VAE fp32", components.vae_fp32, "fp32")):
        decoder = TorchNetwork(VaeDecoder(vae).eval(), networks.VAE_DECODER)
        loop = ProjectLoop(tokenizer, text_encoder, unet, decoder, components, device)
        setups.append(Setup(name, dtype_name, vae_dtype, loop, f"{description}, VAE in {vae_dtype}"))
    return setups


# --- TensorRT --------------------------------------------------------------------------------------


def tensorrt_unavailable(args, device) -> str | None:
    """Why the TensorRT part cannot run here, or None when it can."""
    if args.skip_tensorrt:
        return "--skip-tensorrt given"
    if device.type != "cuda":
        return "TensorRT needs a CUDA GPU (this run is on the CPU)"
    if importlib.util.find_spec("tensorrt") is None:
        return ("the tensorrt module is not installed on this machine; install the TensorRT Python package "
                "(make install-gpu, or use an NGC container's) to measure the engines")
    for module in ("onnx", "polygraphy"):
        if importlib.util.find_spec(module) is None:
            return f"the {module} module is not installed (export/onnx_export.py and export/engines.py need it)"
    try:  # the exporter and engine builder, with what they import
        from export import engines, onnx_export  # noqa: F401
    except ImportError as error:
        return f"the project's exporter cannot be imported here ({error}); install requirements/base.txt"
    if engines.using_tensorrt_rtx():
        return "POLYGRAPHY_USE_TENSORRT_RTX is set: TensorRT-RTX engines are not TensorRT plans; unset it"
    return None


TORCH_DTYPES_BY_TRT = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "UINT8": "uint8"}


class TrtNetwork:
    """A TensorRT plan run with the TensorRT API on PyTorch's current stream, tensors named as the
    spec's; inputs are cast to the engine's dtypes, outputs allocated by PyTorch on the device."""

    def __init__(self, plan: Path, spec: NetworkSpec):
        import tensorrt as trt
        import torch

        self.spec = spec
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BenchError(f"{plan}: TensorRT could not load this plan")
        self.context = self.engine.create_execution_context()
        self.dtypes = {name: getattr(torch, TORCH_DTYPES_BY_TRT[self.engine.get_tensor_dtype(name).name])
                       for name in spec.input_names + spec.output_names}

    def __call__(self, inputs: dict) -> dict:
        import torch

        feeds = {name: inputs[name].to(self.dtypes[name]).contiguous() for name in self.spec.input_names}
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.spec.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise BenchError(f"{self.spec.name}: TensorRT execution failed")
        # The feeds may be freed on return: PyTorch reuses their memory in stream order, after the engine.
        return outputs

    @property
    def activation_mb(self) -> float:
        """Device memory the engine takes for its activations (device_memory_size before TensorRT 10.1)."""
        size = getattr(self.engine, "device_memory_size_v2", None)
        return (self.engine.device_memory_size if size is None else size) / 2**20


# The 8-bit UNets' calibration (random weights: the amax only has to be that of these activations).
GPU_CALIBRATION_PROMPTS = 4
QUANTIZATION_MISSING = ("nvidia-modelopt is not installed (export/quantize.py quantizes with it): pip install "
                        "nvidia-modelopt==0.47.0 (requirements/base.txt's pin, with its requirements) to measure them")


def quantized_unet(components: Components, precision: str, args, device):
    """A copy of the UNet quantized by export/quantize.py, calibrated on the device with the LCM loop at
    --size over random embeddings (the random text encoders' outputs mean nothing either)."""
    import copy

    import torch
    from diffusers import LCMScheduler

    from export.quantize import Calibration, PromptEmbeddings, quantize_unet
    from export.tiny import sdxl_scheduler

    dims, count = components.dims, GPU_CALIBRATION_PROMPTS
    generator = torch.Generator().manual_seed(0)
    embeddings = PromptEmbeddings(torch.randn(count, dims.seq_len, dims.text_dim, generator=generator).to(device),
                                  torch.randn(count, dims.pooled_dim, generator=generator).to(device), None, None)
    calibration = Calibration(("random",) * count, args.steps, 1.0, args.size, "lcm", source="random embeddings")
    unet = copy.deepcopy(components.unet)
    report, _ = quantize_unet(unet, LCMScheduler.from_config(sdxl_scheduler().config), embeddings, calibration, precision)
    log(f"tensorrt: UNet {precision}: {report.quantized_layers} layers quantized, calibrated in {report.seconds:.0f} s")
    return unet


def export_graphs(components: Components, dtype_name: str, device, work: Path, unet_precisions=(), args=None) -> dict:
    """The graphs the setups need, exported by export/onnx_export.py: {key: (graph dir, spec, dtype)};
    `unet_precisions`: also the UNet in those 8-bit precisions (keys unet_fp8, unet_int8)."""
    from export.modules import TextEncoders, UNet, VaeDecoder
    from export.onnx_export import export_network

    graphs = {
        "text_encoder": (lambda: TextEncoders(components.text_encoder, components.text_encoder_2),
                         networks.TEXT_ENCODER, dtype_name),
        "unet": (lambda: UNet(components.unet), networks.UNET, dtype_name),
        "vae_decoder": (lambda: VaeDecoder(components.vae), networks.VAE_DECODER, dtype_name),
        "vae_decoder_fp32": (lambda: VaeDecoder(components.vae_fp32), networks.VAE_DECODER, "fp32"),
    }
    exported = {}
    for key, (make_module, spec, dtype) in graphs.items():
        out_dir = work / key
        log(f"tensorrt: exporting {key} to ONNX ({dtype}) in {out_dir} ...")
        export_network(make_module().eval(), spec, components.dims, dtype, out_dir, device=device.type)
        exported[key] = (out_dir, spec, dtype)
    for precision in unet_precisions:
        key, out_dir = f"unet_{precision}", work / f"unet_{precision}"
        log(f"tensorrt: exporting the UNet in {precision} to ONNX ({dtype_name}) in {out_dir} ...")
        unet = quantized_unet(components, precision, args, device)
        export_network(UNet(unet).eval(), networks.UNET, components.dims, dtype_name, out_dir, device=device.type,
                       precision=precision)
        exported[key] = (out_dir, networks.UNET, dtype_name)
        del unet
    return exported


def build_plans(exported: dict, dims: ModelDims, size: int, max_images: int, work: Path) -> dict:
    """One plan per graph with export/engines.py: the production profiles, widened to --size and --batches.
    A plan whose graph, profile and builder are unchanged since the last run is reused."""
    from contract.layout import ENGINE_FILE, ONNX_FILE
    from export.engines import BuildSettings, build_engine, require_builder

    builder = require_builder()
    default = BuildSettings()
    settings = BuildSettings(max_images=max(default.max_images, max_images), min_size=min(default.min_size, size),
                             opt_size=size, max_size=max(default.max_size, size))
    info = {"builder": builder, "settings": asdict(settings), "plans": {}}
    for key, (graph_dir, spec, dtype) in exported.items():
        start = time.perf_counter()
        build_engine(graph_dir / ONNX_FILE, spec, dims, settings, graph_dir, timing_cache=work / "timing.cache")
        plan = graph_dir / ENGINE_FILE
        info["plans"][key] = {"path": str(plan), "dtype": dtype, "size_mb": round(plan.stat().st_size / 2**20, 1),
                              "build_s": round(time.perf_counter() - start, 1)}
    return info


def tensorrt_setups(components: Components, tokenizer, args, device) -> tuple[list[Setup], dict]:
    """Export the graphs, free the PyTorch modules, build and load the plans: the TensorRT setups."""
    import torch

    work = args.work / args.arch
    precisions = tuple(args.unet_precisions)
    missing = [m for m in ("modelopt",) if importlib.util.find_spec(m) is None]
    if precisions and missing:  # the float rows still run
        log(f"tensorrt: the 8-bit UNet rows skipped: {QUANTIZATION_MISSING}")
        precisions = ()
    exported = export_graphs(components, args.dtype, device, work, precisions, args)
    for key in ("text_encoder", "text_encoder_2", "unet", "vae", "vae_fp32"):  # the GPU is the builder's now
        setattr(components, key, None)
    gc.collect()
    torch.cuda.empty_cache()
    info = {"status": "measured", **build_plans(exported, components.dims, args.size, max(args.batches), work)}
    if tuple(args.unet_precisions) != precisions:
        info["unet_precisions"] = {"status": "skipped", "reason": QUANTIZATION_MISSING}
    engines = {key: TrtNetwork(Path(plan["path"]), exported[key][1]) for key, plan in info["plans"].items()}
    for key, engine in engines.items():
        info["plans"][key]["activation_mb"] = round(engine.activation_mb, 1)
    description = ("the project loop over TensorRT plans (export/onnx_export.py, export/engines.py) run with the "
                   "TensorRT API on PyTorch's stream")
    setups = []
    for name, vae_key, vae_dtype in (("tensorrt", "vae_decoder", args.dtype),
                                     ("tensorrt, VAE fp32", "vae_decoder_fp32", "fp32")):
        loop = ProjectLoop(tokenizer, engines["text_encoder"], engines["unet"], engines[vae_key], components, device)
        setups.append(Setup(name, args.dtype, vae_dtype, loop, f"{description}, VAE in {vae_dtype}"))
    for precision in precisions:  # the 8-bit UNet plans (strongly typed Q/DQ graphs), same VAE
        loop = ProjectLoop(tokenizer, engines["text_encoder"], engines[f"unet_{precision}"], engines["vae_decoder"], components, device)
        setups.append(Setup(f"tensorrt, UNet {precision}", precision, args.dtype, loop,
                            f"{description}, the UNet's graph quantized to {precision} (export/quantize.py), VAE in {args.dtype}"))
    return setups, info


def measure_tensorrt(components, tokenizer, args, device, requests, rows, images) -> tuple[dict, dict]:
    """The TensorRT part: ({}, why) when it cannot run; a failure is recorded, not fatal, so the
    PyTorch figures of a long GPU run are kept."""
    reason = tensorrt_unavailable(args, device)
    if reason:
        log(f"tensorrt: skipped: {reason}")
        return {"status": "skipped", "reason": reason}, {}
    try:
        setups, info = tensorrt_setups(components, tokenizer, args, device)
        run_setups(setups, requests, args.repeats, device, rows, images)
    except Exception as error:  # noqa: BLE001 - any failure of this part is reported in the results
        traceback.print_exc()
        log(f"tensorrt: failed: {type(error).__name__}: {error}")
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}"}, {}
    return info, {setup.name: setup.description for setup in setups}


# --- Measuring -------------------------------------------------------------------------------------


def measure(setup: Setup, request: BenchRequest, repeats: int, device) -> tuple[dict, object]:
    """Warm-up runs, then `repeats` timed runs: a result row, and the last run's images (on the CPU)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(WARMUP_RUNS):
        setup.generate(request, Timeline(device))
    runs = []
    for _ in range(repeats):
        timeline = Timeline(device)
        synchronize(device)
        start = time.perf_counter()
        images = setup.generate(request, timeline)
        synchronize(device)
        runs.append({"end_to_end": (time.perf_counter() - start) * 1e3, **timeline.durations_ms()})
    return result_row(setup, request, runs, device), images.cpu()


def result_row(setup: Setup, request: BenchRequest, runs: list[dict], device) -> dict:
    options = request.options
    steps, batch = options.num_inference_steps, options.num_images_per_prompt
    per_run = {name: [sum(run.get(name, [0.0])) for run in runs] for name in COMPONENTS}
    end_to_end = [run["end_to_end"] for run in runs]
    other = [total - sum(per_run[name][i] for name in COMPONENTS) for i, total in enumerate(end_to_end)]
    row = {
        "setup": setup.name, "unet_dtype": setup.unet_dtype, "vae_dtype": setup.vae_dtype, "batch": batch,
        "cfg": request.cfg, "guidance_scale": options.guidance_scale, "steps": steps, "size": options.height,
        "unet_batch": batch * (2 if request.cfg else 1), "unet_calls_per_run": len(runs[-1].get("unet", [])),
        "end_to_end_ms": summarize(end_to_end),
        "text_encoders_ms": summarize(per_run["text_encoders"]),
        "unet_ms": summarize(per_run["unet"]),
        "unet_ms_per_step": summarize([unet / steps for unet in per_run["unet"]]),
        "vae_decode_ms": summarize(per_run["vae_decode"]),
        "other_ms": summarize(other),  # tokenizing, noise, scheduler steps, Python: e2e less the components
    }
    row["images_per_s"] = batch / (row["end_to_end_ms"]["median"] / 1e3)
    row.update(memory_figures(device))
    return row


def memory_figures(device) -> dict:
    """Peak memory of PyTorch's allocator (TensorRT's own allocations are not in it: see the plans'
    activation_mb), and the device's memory in use by all processes after the runs."""
    import torch

    if device.type != "cuda":
        return {"peak_gpu_memory_mb": None, "gpu_memory_used_mb": None}
    free, total = torch.cuda.mem_get_info(device)
    return {"peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "gpu_memory_used_mb": round((total - free) / 2**20, 1)}


def run_setups(setups: list[Setup], requests: list[BenchRequest], repeats: int, device, rows: list,
               images: dict) -> None:
    import torch

    with torch.inference_mode():
        for setup in setups:
            for request in requests:
                log(f"{setup.name}, {request.label}: {WARMUP_RUNS} warm-up + {repeats} timed runs ...")
                row, images[setup.name, request.label] = measure(setup, request, repeats, device)
                rows.append(row)
                log(f"{setup.name}, {request.label}: {row['end_to_end_ms']['median']:.1f} ms end to end (text "
                    f"{row['text_encoders_ms']['median']:.1f}, UNet {row['unet_ms_per_step']['median']:.1f}/step, "
                    f"VAE {row['vae_decode_ms']['median']:.1f}), {row['images_per_s']:.2f} images/s")


def pixel_difference(images, reference) -> dict:
    difference = (images.int() - reference.int()).abs()
    return {"max_levels": int(difference.max()), "mean_levels": float(difference.float().mean()),
            "values_differing": int((difference > 0).sum()), "values": difference.numel(),
            "image_std": float(images.float().std())}


def parity(images: dict, requests: list[BenchRequest]) -> list[dict]:
    """diffusers' and TensorRT's images against the project loop's, per request (same weights and seeds)."""
    found = []
    for request in requests:
        reference = images.get(("project loop", request.label))
        for setup in ("diffusers", "tensorrt"):
            if reference is not None and (setup, request.label) in images:
                entry = pixel_difference(images[setup, request.label], reference)
                found.append({"request": request.label, "compared": f"{setup} vs project loop", **entry})
    return found


# --- The machine and the report --------------------------------------------------------------------


def machine_info(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "versions": package_versions()}
    if device.type != "cuda":
        return {**info, "gpu": None}
    properties = torch.cuda.get_device_properties(device)
    return {
        **info,
        "gpu": properties.name,
        "gpu_memory_gb": round(properties.total_memory / 2**30, 1),
        "compute_capability": f"{properties.major}.{properties.minor}",
        "driver": nvidia_driver(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        # PyTorch's defaults: fp32 convolutions (the fp32 VAE) run in TF32, fp32 matmuls do not.
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def nvidia_driver() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0] if result.returncode == 0 and lines else None


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("diffusers", "transformers", "tensorrt", "polygraphy", "onnx", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def comparable_to_reference(report: dict) -> bool:
    settings = report["settings"]
    return (report["machine"]["gpu"] is not None and settings["arch"] == "sdxl"
            and settings["size"] == REFERENCE["size"] and settings["steps"] == REFERENCE["steps"])


def is_reference_row(row: dict) -> bool:
    return row["batch"] == REFERENCE["batch"] and not row["cfg"]


def banner(report: dict) -> list[str]:
    settings = report["settings"]
    what = f"{settings['arch']} pipeline, {settings['size']}², {settings['steps']} steps, {settings['dtype']}"
    if report["machine"]["gpu"] is None:
        return [f"**Smoke run on a CPU at a small size ({what}).** It shows that the script works end to end; "
                "its timings say nothing about a GPU. **The GPU numbers are still missing**: run "
                "`python -m benchmarks.gpu` on a machine with a CUDA GPU.", ""]
    if not comparable_to_reference(report):
        return [f"**Not SDXL at 1024², 4 steps ({what})**: not comparable with the reference figures.", ""]
    return []


def ms(summary: dict) -> str:
    return f"{summary['median']:.1f}"


def machine_line(machine: dict) -> str:
    if machine["gpu"] is None:
        return f"CPU ({machine['cpu_cores']} cores, {machine['torch_threads']} for torch), torch {machine['torch']}"
    return (f"{machine['gpu']} ({machine['gpu_memory_gb']} GB), driver {machine['driver']}, CUDA {machine['cuda']}, "
            f"torch {machine['torch']}")


def write_markdown(report: dict, path: Path) -> None:
    settings = report["settings"]
    lines = [f"# SDXL + LCM latency by component: {settings['arch']}, {settings['size']}², {settings['steps']} steps "
             f"({machine_line(report['machine'])})", ""]
    lines += banner(report)
    lines += [
        f"Command: `{report['command']}`. Random weights ({settings['arch']}'s exact configs: speed does not depend "
        f"on the values); fixed prompt, seed {SEED}. CFG: guidance {GUIDANCE_WITH_CFG:g} with a negative prompt (the "
        f"UNet batch doubles); no CFG: guidance 1.0. Median of {settings['repeats']} runs after {WARMUP_RUNS} warm-up "
        "runs (and the p90 of end to end; the JSON has median, p90, min and every run of each figure). Components "
        "are spans timed with CUDA events on a GPU (perf_counter on a CPU), summed per run; `other` is end to end "
        "less the three components (tokenizing, noise, scheduler steps, Python). Peak GPU MB: PyTorch's allocator "
        "(TensorRT's own memory is not in it).",
        "",
    ]
    lines += [f"- `{name}`: {description}" for name, description in report["setups"].items()] + [""]
    lines += results_table(report)
    lines += reference_table(report)
    lines += tensorrt_lines(report["tensorrt"])
    lines += parity_lines(report["parity"])
    path.write_text("\n".join(lines) + "\n")


def results_table(report: dict) -> list[str]:
    comparable = comparable_to_reference(report)
    lines = [
        "| setup | dtype UNet / VAE | batch | CFG | text encoders ms | UNet ms/step | VAE ms | other ms | "
        f"end-to-end ms | p90 ms | images/s | peak GPU MB | vs reference ({REFERENCE['end_to_end_ms']} ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        ratio = "n/a"
        if comparable and is_reference_row(row):
            ratio = f"{row['end_to_end_ms']['median'] / REFERENCE['end_to_end_ms']:.2f}x"
        peak = row["peak_gpu_memory_mb"] if row["peak_gpu_memory_mb"] is not None else "n/a"
        lines.append(
            f"| {row['setup']} | {row['unet_dtype']} / {row['vae_dtype']} | {row['batch']} | "
            f"{'yes' if row['cfg'] else 'no'} | {ms(row['text_encoders_ms'])} | {ms(row['unet_ms_per_step'])} | "
            f"{ms(row['vae_decode_ms'])} | {ms(row['other_ms'])} | {ms(row['end_to_end_ms'])} | "
            f"{row['end_to_end_ms']['p90']:.1f} | {row['images_per_s']:.2f} | {peak} | {ratio} |"
        )
    return lines + ["", "vs reference: our end-to-end median over the reference's 234.2 ms (below 1: faster), for "
                    "batch 1 without CFG of SDXL at 1024², 4 steps, on a GPU; n/a elsewhere.", ""]


def reference_table(report: dict) -> list[str]:
    lines = [f"## Against the reference: {REFERENCE['source']}", ""]
    if not comparable_to_reference(report):
        return lines + ["Not comparable here: the reference is SDXL at 1024², 4 steps, batch 1, on an H100.", ""]
    lines += ["| setup | text encoders ms (ref 0.78) | UNet ms, 4 steps (ref 102.8) | VAE ms (ref 127.0) | "
              "end to end ms (ref 234.2) |", "|---|---|---|---|---|"]
    for row in report["results"]:
        if is_reference_row(row):
            cells = [f"{row[key]['median']:.1f} ({row[key]['median'] / REFERENCE[key]:.2f}x)"
                     for key in ("text_encoders_ms", "unet_ms", "vae_decode_ms", "end_to_end_ms")]
            lines.append(f"| {row['setup']} | " + " | ".join(cells) + " |")
    return lines + [""]


def tensorrt_lines(tensorrt: dict) -> list[str]:
    if tensorrt["status"] != "measured":
        return ["## TensorRT", "", f"Not measured ({tensorrt['status']}): {tensorrt['reason']}.", ""]
    lines = ["## TensorRT", "", f"Builder: {tensorrt['builder']}; plans:", ""]
    for key, plan in tensorrt["plans"].items():
        lines.append(f"- {key} ({plan['dtype']}): {plan['size_mb']} MB, activations {plan.get('activation_mb')} MB, "
                     f"built in {plan['build_s']} s")
    if "unet_precisions" in tensorrt:
        lines += ["", f"8-bit UNet rows not measured: {tensorrt['unet_precisions']['reason']}."]
    return lines + [""]


def parity_lines(entries: list[dict]) -> list[str]:
    lines = ["## Same weights, same seeds: pixel difference from the project loop's images", "",
             "| request | compared | max levels | mean levels | values differing (pixel channels) | image std |",
             "|---|---|---|---|---|---|"]
    for entry in entries:
        lines.append(f"| {entry['request']} | {entry['compared']} | {entry['max_levels']} | "
                     f"{entry['mean_levels']:.5f} | {entry['values_differing']} of {entry['values']} | "
                     f"{entry['image_std']:.1f} |")
    return lines


def write_report(report: dict, out: Path) -> None:
    json_path, markdown_path = Path(f"{out}.json"), Path(f"{out}.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_markdown(report, markdown_path)
    log(f"results: {json_path}, {markdown_path}")


# --- Main ------------------------------------------------------------------------------------------


def run(args, device, argv: list[str]) -> dict:
    import torch

    out = args.out or default_out(device)
    dtype = getattr(torch, {"fp16": "float16", "fp32": "float32"}[args.dtype])
    log(f"{args.arch} components, random weights, {args.dtype} on {device} ...")
    components = build_components(args.arch, dtype, device)
    requests = bench_requests(args)
    rows, images = [], {}
    report = {
        "command": command_line(argv, default_out=args.out is None),
        "smoke": device.type == "cpu",
        "settings": {"device": device.type, "arch": args.arch, "size": args.size, "steps": args.steps,
                     "batches": args.batches, "repeats": args.repeats, "warmup_runs": WARMUP_RUNS, "dtype": args.dtype,
                     "seed": SEED, "prompt": PROMPT, "negative_prompt": NEGATIVE_PROMPT,
                     "guidance_with_cfg": GUIDANCE_WITH_CFG},
        "machine": machine_info(device),
        "reference": REFERENCE,
        "setups": {},
        "results": rows,
        "parity": [],
        "tensorrt": {"status": "pending", "reason": "not run yet"},
    }
    with prompt_tokenizer(components) as tokenizer:
        setups = [diffusers_setup(components, args.dtype)]
        run_setups(setups, requests, args.repeats, device, rows, images)
        # Built after diffusers ran: the project's TextEncoders switches the shared encoders to eager attention.
        setups += project_setups(components, tokenizer, args.dtype, device)
        run_setups(setups[1:], requests, args.repeats, device, rows, images)
        report["setups"] = {setup.name: setup.description for setup in setups}
        report["parity"] = parity(images, requests)
        write_report(report, out)  # the PyTorch figures are safe before the long TensorRT part
        del setups  # they hold the modules, which the TensorRT part frees once exported
        report["tensorrt"], trt_described = measure_tensorrt(components, tokenizer, args, device, requests, rows,
                                                             images)
    report["setups"].update(trt_described)
    report["parity"] = parity(images, requests)
    write_report(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        with quiet_libraries():
            run(args, device, argv)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
