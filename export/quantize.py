"""8-bit networks: the UNet in FP8 (E4M3) or INT8, the VAE decoder in INT8, as Q/DQ ONNX graphs.

NVIDIA Model Optimizer (`mtq.quantize`) puts quantizers on the convolutions and linear layers of the
PyTorch module and calibrates them (max calibration: the largest magnitude each quantizer sees) on
what the served recipe itself runs: its scheduler, step count, guidance and size, on a set of prompts
(diffusers' StableDiffusionXLPipeline driving the UNet being calibrated). The VAE decoder is calibrated
on the latents those runs end with. Then the usual TorchScript export writes QuantizeLinear /
DequantizeLinear pairs (opset 19: fp16 scales, and the FP8 types) that ONNX Runtime runs and TensorRT
builds strongly typed plans of.

FP8 is exported as NVIDIA's MLPerf Inference v4.1 SDXL submission does it: calibrated as FP8, written
as INT8 Q/DQ with the scale FP8 needs (amax * 127/448 as the INT8 amax: scale = amax / 448), then the
zero points retyped to FLOAT8E4M3FN, which makes each pair an FP8 one (no TensorRT custom ops).

Layers kept in the export dtype (not quantized), from the published recipes:
- UNet: NVIDIA's MLPerf v4.1 SDXL FP8 UNet (closed/NVIDIA/code/stable-diffusion-xl/modelopt/utils.py,
  filter_func_unet), which is ModelOpt's diffusers example filter (time and class embeddings, conv_in,
  conv_out, shortcut convolutions) plus up_blocks.2.resnets.2's two convolutions.
- VAE decoder: the same submission's INT8 VAE filter (filter_func: conv_in, conv_out, post_quant_conv,
  the attention projections, the mid block, up_blocks.3 and up_blocks.2.resnets.1-2).
`make bench-quant` (benchmarks/quantization.py) sweeps the UNet's other layer groups: what keeping
each in 16 bit gains (docs/exporting.md, "Quantized UNet and VAE").
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contract.recipes import SCHEDULERS, Recipe

from .progress import log, step
from .sources import ExportError, _diffusers_errors_only

FLOAT_PRECISIONS = ("fp16", "fp32")
QUANTIZED = ("fp8", "int8")
UNET_PRECISIONS = (*FLOAT_PRECISIONS, *QUANTIZED)
VAE_PRECISIONS = (*FLOAT_PRECISIONS, "int8")
# QuantizeLinear with fp16 scales and the FLOAT8E4M3FN type are opset 19 (ONNX Runtime's CPU kernels
# run both there); the float graphs stay at the exporter's opset 17.
QUANTIZED_OPSET = 19
FP8_E4M3_MAX = 448.0  # largest finite E4M3FN value
INT8_MAX = 127.0

# Quantizer names (module path + ".input_quantizer" / ".weight_quantizer") that stay disabled.
_PUBLISHED_UNET_KEEP = (r"time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding"
                        r"|up_blocks\.2\.resnets\.2\.conv1|up_blocks\.2\.resnets\.2\.conv2")
UNET_KEEP = re.compile(rf".*({_PUBLISHED_UNET_KEEP}).*")
# Our own sensitivity sweep (make bench-quant: each layer group kept in float alone, UNet output SNR):
# INT8's per-tensor activations lose most at the two downsampler convolutions, whose inputs carry the
# down blocks' residual stream: keeping those 2 layers gained 4.7 dB of the 6.0 dB that keeping all
# 330 down-block layers gains (full-size UNet; tiny: 7.6 of 8.8). FP8 gains 0.6 dB there (tiny): kept
# in INT8 only.
UNET_KEEP_INT8 = re.compile(rf".*({_PUBLISHED_UNET_KEEP}|downsamplers\.\d+\.conv).*")
VAE_DECODER_KEEP = re.compile(r"^encoder\..*|.*(conv_out|conv_in|quant_conv|to_v|to_k|to_q|mid_block|decoder\.up_blocks\.3"
                              r"|up_blocks\.2\.resnets\.2|up_blocks\.2\.resnets\.1).*")

def unet_keep(precision: str) -> re.Pattern:
    """The UNet layers a precision leaves in the export dtype."""
    return UNET_KEEP_INT8 if precision == "int8" else UNET_KEEP


DEFAULT_PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
# ModelOpt's SDXL INT8 recipe calibrates on 32 prompts (examples/diffusers, build_sdxl_8bit_engine.sh).
DEFAULT_CALIBRATION_COUNT = 32
# Prompts per pipeline call (CFG doubles the UNet batch).
CALIBRATION_BATCH = 4


@dataclass(frozen=True)
class Calibration:
    """What the quantizers are calibrated on: the served recipe's own loop, on these prompts."""

    prompts: tuple[str, ...]
    steps: int
    guidance: float
    size: int
    scheduler: str
    eta: float | None = None
    seed: int = 0
    source: str = ""

    @classmethod
    def for_recipe(cls, recipe: Recipe, prompts: tuple[str, ...], *, size: int | None = None, source: str = "") -> "Calibration":
        return cls(prompts, recipe.default_steps, recipe.default_guidance, size or recipe.size, recipe.scheduler,
                   recipe.eta, source=source)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0

    def describe(self) -> dict:
        data = asdict(self)
        data["prompts"] = len(self.prompts)
        return data


def read_prompts(path: Path, count: int = DEFAULT_CALIBRATION_COUNT, flag: str = "--calibration-prompts") -> tuple[str, ...]:
    """The first `count` prompts of a text file: one a line; blank lines and lines starting with # skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ExportError(f"{flag} {str(path)!r}: cannot read it ({error}); expected a UTF-8 text file, one prompt a line") from None
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ExportError(f"{flag} {str(path)!r}: no prompts in it; expected one prompt a line")
    if count < 1:
        raise ExportError(f"--calibration-count {count}: expected at least 1")
    return prompts[:count]


def check_precisions(dtype: str, unet: str | None, vae: str | None) -> tuple[str, str]:
    """The UNet's and VAE decoder's precisions (None: the export dtype); a float one other than the
    export dtype is refused (the graphs' inputs and outputs carry the export dtype)."""
    resolved = []
    for flag, value, accepted in (("--unet-precision", unet, UNET_PRECISIONS), ("--vae-precision", vae, VAE_PRECISIONS)):
        value = value or dtype
        if value not in accepted:
            raise ExportError(f"{flag} {value!r}: expected one of {', '.join(accepted)}")
        if value in FLOAT_PRECISIONS and value != dtype:
            raise ExportError(f"{flag} {value} with --dtype {dtype}: a float network is exported in --dtype; "
                              f"give --dtype {value}, or {flag} {dtype} / {' / '.join(a for a in accepted if a in QUANTIZED)}")
        resolved.append(value)
    return resolved[0], resolved[1]


def _mtq():
    import warnings

    with warnings.catch_warnings():  # its notes on the transformers version and missing CUDA extensions
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


def quant_config(precision: str, export_dtype: str) -> dict:
    """ModelOpt's INT8 or FP8 default config (per-channel INT8 weights, per-tensor activations; E4M3
    per tensor), its Q/DQ in the export dtype (TensorRT's strongly typed plans want the scales in the
    dtype the layer runs in). The layers kept in 16 bit are disabled by name (disable_kept): a regex,
    which the config's globs cannot say."""
    mtq = _mtq()
    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG if precision == "int8" else mtq.FP8_DEFAULT_CFG)
    high_precision = {"fp16": "Half", "fp32": "Float"}[export_dtype]
    for entry in config["quant_cfg"]:
        if entry.get("quantizer_name") in ("*weight_quantizer", "*input_quantizer") and "cfg" in entry:
            entry["cfg"]["trt_high_precision_dtype"] = high_precision
    return config


def disable_kept(module: torch.nn.Module, keep: re.Pattern) -> list[str]:
    """Disable every quantizer whose name matches `keep`; the names of the layers kept."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    kept = set()
    for name, quantizer in module.named_modules():
        if isinstance(quantizer, TensorQuantizer) and keep.match(name):
            quantizer.disable()
            kept.add(name.rsplit(".", 1)[0])
    return sorted(kept)


@dataclass
class QuantizationReport:
    """What was quantized and on what: written into the graph's export_info.json."""

    precision: str
    quantized_layers: int
    kept_layers: list[str]
    calibration: dict
    seconds: float
    keep_pattern: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _quantize(module, precision: str, keep: re.Pattern, forward_loop) -> tuple[int, list[str]]:
    """Insert quantizers (Q/DQ in the module's dtype), disable the kept ones, calibrate (in fp32: the
    amax an fp16 run would round to, at CPU speed), and return (enabled weight quantizers, kept layers)."""
    import torch

    mtq = _mtq()
    from modelopt.torch.quantization.nn import TensorQuantizer

    dtype = next(module.parameters()).dtype
    with _diffusers_errors_only():  # its note on casting with to() is about running in fp16 on a CPU
        module.to(torch.float32)
    with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints "Inserted N quantizers"
        mtq.quantize(module, quant_config(precision, "fp16" if dtype == torch.float16 else "fp32"), forward_loop=None)
    kept = disable_kept(module, keep)
    mtq.calibrate(module, algorithm="max", forward_loop=forward_loop)
    with _diffusers_errors_only():
        module.to(dtype)
    enabled = sum(1 for name, q in module.named_modules()
                  if isinstance(q, TensorQuantizer) and name.endswith("weight_quantizer") and q.is_enabled)
    return enabled, kept


def _dtype_name(module) -> str:
    import torch

    return {torch.float16: "fp16", torch.float32: "fp32"}.get(next(module.parameters()).dtype, "its dtype")


def fp8_as_int8_scales(module: torch.nn.Module) -> None:
    """MLPerf's FP8 export: each FP8 quantizer becomes an 8-bit one whose amax gives FP8's scale
    (amax/448) as INT8's (amax'/127); retype_fp8_zero_points finishes it on the graph. Run just before
    tracing (export_network): from then on the module simulates INT8, not FP8. Converts each
    quantizer once (unet and unet_lora are traced from the same module)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for _, quantizer in module.named_modules():
        if isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled and quantizer.num_bits == (4, 3):
            quantizer.num_bits = 8
            quantizer.amax = quantizer.amax * (INT8_MAX / FP8_E4M3_MAX)


def retype_fp8_zero_points(model: onnx.ModelProto) -> int:
    """Every Q/DQ pair's zero point becomes a FLOAT8E4M3FN zero: the INT8 pairs fp8_as_int8_scales
    exported become FP8 pairs with the same scale. Returns the number of Q/DQ nodes changed."""
    import numpy as np
    import onnx
    constants = {node.output[0]: node for node in model.graph.node if node.op_type == "Constant"}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    retyped, count = {}, 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        name = node.input[2]
        if name not in retyped:
            if name in initializers:
                shape = list(initializers[name].dims)
            elif name in constants:
                shape = list(onnx.helper.get_attribute_value(constants[name].attribute[0]).dims)
            else:
                raise ExportError(f"internal: zero point {name!r} of {node.name} is neither an initializer nor a constant")
            zero = onnx.helper.make_tensor(f"{name}_fp8", onnx.TensorProto.FLOAT8E4M3FN, shape, [0.0] * int(np.prod(shape or [1])))
            model.graph.initializer.append(zero)
            retyped[name] = zero.name
        node.input[2] = retyped[name]
        if node.op_type == "QuantizeLinear":
            node.attribute.append(onnx.helper.make_attribute("saturate", 1))
        count += 1
    # The INT8 zero points no longer used.
    used = {name for node in model.graph.node for name in node.input}
    keep_nodes = [n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] in retyped and n.output[0] not in used)]
    del model.graph.node[:]
    model.graph.node.extend(keep_nodes)
    keep_init = [t for t in model.graph.initializer if not (t.name in retyped and t.name not in used)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep_init)
    return count


def count_qdq(model: onnx.ModelProto) -> dict[str, int]:
    """Q/DQ nodes by the quantized type (from the zero point): e.g. {"INT8": 734}."""
    import onnx
    types = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = onnx.helper.get_attribute_value(node.attribute[0])
            if isinstance(value, onnx.TensorProto):
                types[node.output[0]] = value.data_type
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            name = onnx.TensorProto.DataType.Name(types.get(node.input[2], 0))
            counts[name] = counts.get(name, 0) + 1
    return counts


# --- Calibration runs ---------------------------------------------------------------------------

@dataclass
class PromptEmbeddings:
    """The text encoders' outputs for the calibration prompts (and the empty negative prompt)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_embeds: torch.Tensor | None
    negative_pooled: torch.Tensor | None


def encode_prompts(pipe, calibration: Calibration) -> PromptEmbeddings:
    """diffusers' encode_prompt over the prompts (the text encoders as loaded: LoRAs fused), in fp32,
    on the encoders' device."""
    import torch
    device = next(pipe.text_encoder_2.parameters()).device  # --device cuda: the encoders are on the GPU
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            list(calibration.prompts), device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=calibration.uses_cfg)
    as32 = (lambda t: None if t is None else t.float())
    return PromptEmbeddings(as32(embeds), as32(pooled), as32(negative), as32(negative_pooled))


def _calibration_pipeline(unet, scheduler):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_recipe(unet, scheduler, embeddings: PromptEmbeddings, calibration: Calibration, *, label: str = "") -> torch.Tensor:
    """The recipe's loop over every prompt, CALIBRATION_BATCH at a time; the final latents [N, 4, h, w]."""
    import torch
    pipe = _calibration_pipeline(unet, scheduler)
    latents = []
    count = len(calibration.prompts)
    eta = {"eta": calibration.eta} if calibration.eta is not None and SCHEDULERS[calibration.scheduler].takes_eta else {}
    start = time.perf_counter()
    for first in range(0, count, CALIBRATION_BATCH):
        chunk = slice(first, min(first + CALIBRATION_BATCH, count))
        negatives = {}
        if calibration.uses_cfg:
            negatives = {"negative_prompt_embeds": embeddings.negative_embeds[chunk],
                         "negative_pooled_prompt_embeds": embeddings.negative_pooled[chunk]}
        generator = [torch.Generator().manual_seed(calibration.seed + i) for i in range(chunk.start, chunk.stop)]
        with torch.no_grad():
            out = pipe(prompt_embeds=embeddings.prompt_embeds[chunk], pooled_prompt_embeds=embeddings.pooled[chunk],
                       num_inference_steps=calibration.steps, guidance_scale=calibration.guidance,
                       height=calibration.size, width=calibration.size, generator=generator,
                       output_type="latent", **negatives, **eta)
        latents.append(out.images.float())
        done = chunk.stop
        log(f"{label}calibration: {done}/{count} prompts, {calibration.steps} steps at {calibration.size}x{calibration.size}"
            f"{' with CFG ' + format(calibration.guidance, 'g') if calibration.uses_cfg else ''} "
            f"({time.perf_counter() - start:.0f} s)")
    return torch.cat(latents)


def quantize_unet(unet, scheduler, embeddings: PromptEmbeddings, calibration: Calibration,
                  precision: str, keep: re.Pattern | None = None) -> tuple[QuantizationReport, torch.Tensor]:
    """Quantize `unet` (diffusers' UNet2DConditionModel) in place, calibrated on the recipe's loop, with
    `keep`'s layers left alone (default: the precision's, unet_keep). Returns the report and the
    calibration runs' final latents (the VAE decoder's calibration data)."""
    start = time.perf_counter()
    latents = []

    def forward_loop(model):
        latents.append(run_recipe(model, scheduler, embeddings, calibration, label="unet "))

    keep = keep or unet_keep(precision)
    with step(f"unet: {precision} quantizers, calibrated on {len(calibration.prompts)} prompts"):
        quantized, kept = _quantize(unet, precision, keep, forward_loop)
    log(f"unet: {quantized} layers {precision}, {len(kept)} kept in {_dtype_name(unet)}: {', '.join(kept)}")
    report = QuantizationReport(precision, quantized, kept, calibration.describe(), time.perf_counter() - start, keep.pattern)
    return report, latents[0]


def float_latents(unet, scheduler, embeddings: PromptEmbeddings, calibration: Calibration) -> torch.Tensor:
    """The recipe's final latents with the float UNet (the VAE's calibration data when the UNet stays float)."""
    import torch
    dtype = next(unet.parameters()).dtype
    with _diffusers_errors_only():
        unet.to(torch.float32)
    try:
        return run_recipe(unet, scheduler, embeddings, calibration, label="vae_decoder ")
    finally:
        with _diffusers_errors_only():
            unet.to(dtype)


def quantize_vae_decoder(vae, decoder_module, latents: torch.Tensor, precision: str,
                         calibration: Calibration) -> QuantizationReport:
    """Quantize the VAE's decoder in place (its encoder stays float: the filter keeps `encoder.*`),
    calibrated by decoding `latents` through `decoder_module` (the vae_decoder graph's module)."""
    import torch
    start = time.perf_counter()

    def forward_loop(_):
        with torch.no_grad():
            for first in range(0, len(latents), CALIBRATION_BATCH):
                decoder_module(latents[first:first + CALIBRATION_BATCH].to(next(vae.parameters()).dtype))

    with step(f"vae_decoder: {precision} quantizers, calibrated on {len(latents)} latents"):
        quantized, kept = _quantize(vae, precision, VAE_DECODER_KEEP, forward_loop)
    kept = [name for name in kept if not name.startswith("encoder.")]
    log(f"vae_decoder: {quantized} layers {precision}, {len(kept)} kept in {_dtype_name(vae)} (and the encoder)")
    return QuantizationReport(precision, quantized, kept, calibration.describe(), time.perf_counter() - start,
                              VAE_DECODER_KEEP.pattern)


@dataclass(frozen=True)
class Precisions:
    """The export's per-network precisions and what the 8-bit ones are calibrated on."""

    unet: str
    vae_decoder: str
    calibration: Calibration | None = None

    def __post_init__(self):
        if self.quantizes_any and self.calibration is None:
            raise ValueError(f"unet {self.unet}, vae_decoder {self.vae_decoder}: quantized networks need a Calibration")

    @property
    def quantizes_unet(self) -> bool:
        return self.unet in QUANTIZED

    @property
    def quantizes_vae(self) -> bool:
        return self.vae_decoder in QUANTIZED

    @property
    def quantizes_any(self) -> bool:
        return self.quantizes_unet or self.quantizes_vae

    def of(self, network: str) -> str | None:
        """The 8-bit precision of a network's graph; None: the export dtype."""
        from contract import networks

        if network in networks.UNET_GRAPHS and self.quantizes_unet:
            return self.unet
        if network == networks.VAE_DECODER.name and self.quantizes_vae:
            return self.vae_decoder
        return None
