"""One description per network: the single source of truth for tensor names, dtypes and shapes.

Export, the Triton configs and the serving code all derive from (or are checked against) the
`NETWORKS` below. A dimension is either a fixed int, or a symbol:
- dynamic symbols (`batch`, `latent_height`, ...) become dynamic axes in ONNX and ranges in the
  TensorRT profiles;
- model symbols (`text_dim`, `pooled_dim`, ...) are constants of one model, resolved by `ModelDims`
  (SDXL's values by default, smaller ones for the tiny test pipeline).
A dtype is a Triton type name, or `COMPUTE`: the export dtype (FP16 or FP32) of the floating tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

COMPUTE = "COMPUTE"

# Dynamic axes, named after what they count. Image sizes are multiples of 64, so latent sizes are
# multiples of 8 (the UNet downsamples latents twice more, by 4, so they must be multiples of 4).
DYNAMIC_DIMS = ("batch", "latent_height", "latent_width", "image_height", "image_width", "lora_rank", "control_size",
                "control_modes", "depth_height", "depth_width")

# A ControlNet's residuals (diffusers' ControlNetModel, as StableDiffusionXLControlNetPipeline hands them
# to the UNet): one per output of the UNet's down path (conv_in, each down block's resnets, each
# downsampler) and one for the mid block, each at its block's channels and size. SDXL at 1024²: 3 x
# [320, 128, 128], [320, 64, 64], 2 x [640, 64, 64], [640, 32, 32], 2 x [1280, 32, 32], mid [1280, 32, 32].
# They travel as ONE tensor per sample, `control_residuals` [batch, control_size]: every residual
# flattened, in that order, side by side; the UNet graph cuts it back (export/modules.py). One tensor
# whatever the architecture, so specs, configs, batching and scaling (a ControlNet's scale multiplies
# it, several ControlNets add) stay the same for SDXL, SSD-1B and the tiny model.
# SDXL's UNet downsamples latents twice: every residual's size is latent / 1, 2 or 4, and control_size
# is control_width (elements per 4 x 4 patch of latent pixels) x (latent_height / 4) x (latent_width / 4).
CONTROL_LEVELS = 2


def control_residual_layout(block_out_channels, layers_per_block) -> tuple[tuple[int, int], ...]:
    """(channels, level) of each residual a ControlNet hands the UNet, in the UNet's order; a
    residual of level k is latent / 2**k wide and high. From the UNet's (or the ControlNet's) config."""
    blocks = len(block_out_channels)
    layers = list(layers_per_block) if isinstance(layers_per_block, (list, tuple)) else [layers_per_block] * blocks
    if blocks - 1 > CONTROL_LEVELS:
        raise ValueError(f"a UNet of {blocks} down blocks downsamples {blocks - 1} times; SDXL's do at most {CONTROL_LEVELS}")
    residuals = [(block_out_channels[0], 0)]  # conv_in
    for level, channels in enumerate(block_out_channels):
        residuals += [(channels, level)] * layers[level]
        if level < blocks - 1:  # the block's downsampler
            residuals.append((channels, level + 1))
    residuals.append((block_out_channels[-1], blocks - 1))  # the mid block
    return tuple(residuals)


def control_width(residuals: tuple[tuple[int, int], ...]) -> int:
    """ModelDims.control_width of a residual layout: its elements per 4 x 4 patch of latent pixels."""
    return sum(channels * 4 ** (CONTROL_LEVELS - level) for channels, level in residuals)


def unet_control_width(block_out_channels, layers_per_block) -> int:
    """control_width of a UNet's ControlNets; 0 for a UNet no SDXL ControlNet fits (more down blocks)."""
    try:
        return control_width(control_residual_layout(block_out_channels, layers_per_block))
    except ValueError:
        return 0


# SDXL keeps its time conditioning in six numbers per sample:
# (original_height, original_width, crop_top, crop_left, target_height, target_width).
TIME_IDS_DIM = 6
# The SDXL refiner's in five: (original_height, original_width, crop_top, crop_left, aesthetic_score)
# (StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score, as the refiner's model_index.json sets it).
REFINER_TIME_IDS_DIM = 5

NUMPY_DTYPES = {
    "FP16": np.float16,
    "FP32": np.float32,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
}


@dataclass(frozen=True)
class ModelDims:
    """The model constants that appear in tensor shapes (defaults: SDXL base 1.0)."""

    seq_len: int = 77  # CLIP tokenizers' model_max_length
    text_dim: int = 2048  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG) penultimate hidden states
    pooled_dim: int = 1280  # text_encoder_2's projection_dim
    # The refiner's text conditioning: text_encoder_2's (OpenCLIP bigG's) penultimate hidden states alone,
    # the last refiner_text_dim columns of the text encoder's prompt_embeds (no second encode).
    refiner_text_dim: int = 1280
    latent_channels: int = 4
    vae_scale_factor: int = 8  # 2 ** (len(vae.config.block_out_channels) - 1)
    # The LoRA inputs' widths (contract/loras.py): the sum over the network's sites of the down
    # matrices' columns and of the up matrices' rows. SDXL: 794 UNet sites (51 convolutions), 265
    # text-encoder sites (tests/test_sdxl.py counts them on SDXL's architecture).
    unet_lora_in: int = 1_593_892
    unet_lora_out: int = 1_494_404
    text_lora_in: int = 452_864
    text_lora_out: int = 452_864
    # control_residuals' width per 4 x 4 latent patch (control_width() of SDXL's residual layout).
    control_width: int = 26_240
    # The IP-Adapter's (contract/ip_adapters.py): image tokens per image (4: the plain adapter's
    # ImageProjection; 16: Plus's Resampler queries) and the cross-attention layers that take them (SDXL: 70).
    ip_tokens: int = 4
    ip_layers: int = 70

    @classmethod
    def from_pipeline(cls, pipe) -> "ModelDims":
        """A pipeline's; with its IP-Adapter (`pipe.ip_adapter`, tests attach one), the adapter's tokens."""
        from .ip_adapters import ip_layer_names

        ip_dims = {"ip_layers": len(ip_layer_names(pipe.unet.attn_processors))}
        if getattr(pipe, "ip_adapter", None) is not None:
            ip_dims["ip_tokens"] = pipe.ip_adapter.tokens
        return cls.from_configs(pipe.tokenizer.model_max_length, pipe.text_encoder.config, pipe.text_encoder_2.config,
                                pipe.unet.config, pipe.vae.config, lora_widths=lora_widths(pipe), ip_dims=ip_dims)

    @classmethod
    def from_configs(cls, seq_len: int, text_encoder, text_encoder_2, unet, vae, lora_widths: dict | None = None,
                     ip_dims: dict | None = None) -> "ModelDims":
        """From the components' configs alone (objects or mappings), without loading any weights;
        `lora_widths` (see lora_widths()) from the modules, SDXL's when not given; `ip_dims` (ip_tokens,
        ip_layers) from the IP-Adapter, SDXL's plain adapter's when not given."""

        def get(config, key):
            return config[key] if isinstance(config, dict) else getattr(config, key)

        return cls(
            seq_len=int(seq_len),
            text_dim=get(text_encoder, "hidden_size") + get(text_encoder_2, "hidden_size"),
            pooled_dim=get(text_encoder_2, "projection_dim"),
            refiner_text_dim=get(text_encoder_2, "hidden_size"),
            latent_channels=get(unet, "in_channels"),
            vae_scale_factor=2 ** (len(get(vae, "block_out_channels")) - 1),
            control_width=unet_control_width(get(unet, "block_out_channels"), get(unet, "layers_per_block")),
            **(lora_widths or {}), **(ip_dims or {}),
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SDXL_DIMS = ModelDims()


def lora_widths(components) -> dict[str, int]:
    """ModelDims' LoRA widths of a pipeline's (or any object's) unet, text_encoder and text_encoder_2
    modules; meta modules do."""
    from .loras import sites_of

    modules = {name: getattr(components, name) for name in ("unet", "text_encoder", "text_encoder_2")}
    unet, text = sites_of(UNET_NAME, modules), sites_of(TEXT_ENCODER_NAME, modules)
    return {"unet_lora_in": unet.lora_in, "unet_lora_out": unet.lora_out,
            "text_lora_in": text.lora_in, "text_lora_out": text.lora_out}


UNET_NAME, TEXT_ENCODER_NAME = "unet", "text_encoder"
UNET_LORA_NAME = "unet_lora"
REFINER_UNET_NAME = "refiner_unet"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of NUMPY_DTYPES, or COMPUTE
    dims: tuple[int | str, ...]

    def resolved_dtype(self, compute_dtype: str) -> str:
        return compute_dtype if self.dtype == COMPUTE else self.dtype

    def numpy_dtype(self, compute_dtype: str):
        return NUMPY_DTYPES[self.resolved_dtype(compute_dtype)]

    def shape(self, model: ModelDims, **dynamic: int) -> tuple[int, ...]:
        """Concrete shape: model symbols from `model`, dynamic ones from keyword arguments (image
        sizes, when not given, from the latent sizes: x vae_scale_factor)."""
        values = {**model.as_dict(), **dynamic}
        for image, latent in (("image_height", "latent_height"), ("image_width", "latent_width")):
            if image not in values and latent in values:
                values[image] = values[latent] * model.vae_scale_factor
        if "control_size" not in values and "latent_height" in values and "latent_width" in values:
            patches = (values["latent_height"] // 2 ** CONTROL_LEVELS) * (values["latent_width"] // 2 ** CONTROL_LEVELS)
            values["control_size"] = model.control_width * patches
        for depth, image in (("depth_height", "image_height"), ("depth_width", "image_width")):
            if depth not in values and image in values:  # the image's size up to the depth estimator's patch multiple
                values[depth] = -(-values[image] // DEPTH_PATCH) * DEPTH_PATCH
        return tuple(d if isinstance(d, int) else values[d] for d in self.dims)

    def static_dims(self, model: ModelDims) -> tuple[int, ...]:
        """Dims with model symbols resolved and dynamic ones as -1 (Triton's and ONNX's wildcard)."""
        return tuple(
            -1 if d in DYNAMIC_DIMS else (d if isinstance(d, int) else getattr(model, d))
            for d in self.dims
        )

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if d in DYNAMIC_DIMS}


@dataclass(frozen=True)
class NetworkSpec:
    name: str  # also the model's name in the Triton model repository
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")


def lora_inputs(prefix: str) -> tuple[TensorSpec, ...]:
    """Each sample's LoRA weights (contract/loras.py): every site's down and up matrices side by
    side, the request's LoRAs stacked along the rank. No LoRA: zeros of rank 1."""
    return (
        TensorSpec("lora_down", COMPUTE, ("batch", "lora_rank", f"{prefix}_lora_in")),
        TensorSpec("lora_up", COMPUTE, ("batch", f"{prefix}_lora_out", "lora_rank")),
    )


TEXT_ENCODER = NetworkSpec(
    name=TEXT_ENCODER_NAME,
    inputs=(
        TensorSpec("input_ids", "INT32", ("batch", "seq_len")),  # CLIP ViT-L tokens
        TensorSpec("input_ids_2", "INT32", ("batch", "seq_len")),  # OpenCLIP bigG tokens
        *lora_inputs("text"),
    ),
    outputs=(
        TensorSpec("prompt_embeds", COMPUTE, ("batch", "seq_len", "text_dim")),
        TensorSpec("pooled_prompt_embeds", COMPUTE, ("batch", "pooled_dim")),
    ),
)

UNET = NetworkSpec(
    name=UNET_NAME,
    inputs=(
        TensorSpec("sample", COMPUTE, ("batch", "latent_channels", "latent_height", "latent_width")),
        # One timestep per sample, so requests at different steps can share a batch. FP32 in
        # every export: the UNet computes its sinusoidal time embedding in fp32 anyway.
        TensorSpec("timestep", "FP32", ("batch",)),
        TensorSpec("encoder_hidden_states", COMPUTE, ("batch", "seq_len", "text_dim")),
        TensorSpec("text_embeds", COMPUTE, ("batch", "pooled_dim")),
        TensorSpec("time_ids", COMPUTE, ("batch", TIME_IDS_DIM)),
    ),
    outputs=(
        TensorSpec("noise_pred", COMPUTE, ("batch", "latent_channels", "latent_height", "latent_width")),
    ),
)

# The same UNet (same weights, same export) with the LoRA inputs: the UNet calls of batches in which
# a request names LoRAs run it, rows without LoRAs sending zeros; batches without any run `unet`,
# which pays nothing for the capability (docs/loras.md: why two graphs).
UNET_LORA = NetworkSpec(name=UNET_LORA_NAME, inputs=(*UNET.inputs, *lora_inputs("unet")), outputs=UNET.outputs)

# The SDXL refiner's UNet (recipe sdxl-base-refiner: the expert ensemble's last steps, serving/denoise.py):
# SDXL's UNet interface with the bigG-only text conditioning and five time ids. Served only by the
# repositories whose recipe has a refiner (OPTIONAL_NETWORKS); no LoRA inputs (SDXL LoRAs adapt the base).
REFINER_CONDITIONING = {
    "encoder_hidden_states": TensorSpec("encoder_hidden_states", COMPUTE, ("batch", "seq_len", "refiner_text_dim")),
    "time_ids": TensorSpec("time_ids", COMPUTE, ("batch", REFINER_TIME_IDS_DIM)),
}
REFINER_UNET = NetworkSpec(
    name=REFINER_UNET_NAME,
    inputs=tuple(REFINER_CONDITIONING.get(t.name, t) for t in UNET.inputs),
    outputs=UNET.outputs,
)

VAE_DECODER = NetworkSpec(
    name="vae_decoder",
    inputs=(TensorSpec("latents", COMPUTE, ("batch", "latent_channels", "latent_height", "latent_width")),),
    # Displayable RGB pixels, NHWC, the endpoint's `images` as they are.
    outputs=(TensorSpec("images", "UINT8", ("batch", "image_height", "image_width", 3)),),
)

# The streaming endpoint's previews: a TAESD-style AutoencoderTiny (production: madebyollin/taesdxl,
# about 1.2 M decoder parameters against the VAE's 49 M) decoding the latents of an unfinished
# request, with the VAE decoder's interface (same unscaling and pixel conversion inside the graph).
PREVIEW_DECODER = NetworkSpec(name="preview_decoder", inputs=VAE_DECODER.inputs, outputs=VAE_DECODER.outputs)

# img2img and inpainting (serving/denoise.py): the init image's latent distribution, as diffusers'
# `VaeImageProcessor.preprocess` + `AutoencoderKL.encode` make it, scaled as latents are (x scaling
# factor), so that the loop draws each image's latents as mean + std * noise from that image's own
# generator, in the pipelines' order. One image per request (the init image is shared by its images).
VAE_ENCODER = NetworkSpec(
    name="vae_encoder",
    inputs=(TensorSpec("images", "UINT8", ("batch", "image_height", "image_width", 3)),),
    outputs=(
        TensorSpec("latent_mean", COMPUTE, ("batch", "latent_channels", "latent_height", "latent_width")),
        TensorSpec("latent_std", COMPUTE, ("batch", "latent_channels", "latent_height", "latent_width")),
    ),
)

# The safety checker (serving/safety.py): diffusers' StableDiffusionSafetyChecker (CLIP ViT-L/14's vision
# tower, a projection, and the embeddings of 17 concepts and 3 "special care" ones), up to its cosine
# distances. The image preprocessing (CLIPImageProcessor: PIL bicubic resize, center crop, CLIP's
# normalization) and the scoring (thresholds, 3-decimal rounding, the special-care adjustment) run in
# Python, as diffusers runs them, so the flags are diffusers'. Pixel values arrive in FP32 in every
# export (the graph casts them, as the pipelines do with `.to(dtype)`); the distances leave in FP32
# (diffusers casts them to float before scoring).
SAFETY_IMAGE_SIZE = 224  # CompVis/stable-diffusion-safety-checker: preprocessor crop_size, vision image_size
SAFETY_CONCEPTS, SAFETY_SPECIAL_CARE = 17, 3  # StableDiffusionSafetyChecker's concept_embeds, special_care_embeds
SAFETY_CHECKER = NetworkSpec(
    name="safety_checker",
    inputs=(TensorSpec("pixel_values", "FP32", ("batch", 3, SAFETY_IMAGE_SIZE, SAFETY_IMAGE_SIZE)),),
    outputs=(
        TensorSpec("concept_distances", "FP32", ("batch", SAFETY_CONCEPTS)),
        TensorSpec("special_care_distances", "FP32", ("batch", SAFETY_SPECIAL_CARE)),
    ),
)

# The depth estimator that makes depth control maps on the server (control_preprocess of a ControlNet
# declaring `depth`, and a ControlNet-Union's depth mode): Depth Anything V2 Small through transformers
# (DepthAnythingForDepthEstimation, `export onnx --depth-estimator`). Its input is its image processor's
# output (resized with the aspect kept to multiples of its ViT's 14-pixel patches, ImageNet-normalized: on
# the loop's CPU, as the safety checker's), its output relative depth at that size; the loop resizes and
# normalizes it to the control map as diffusers' SDXL depth ControlNet example does (serving/depth.py).
DEPTH_PATCH = 14  # DINOv2's patch size: the processor resizes to multiples of it
DEPTH_SIDE = 518  # Depth Anything's processor: the side nearer its scale goes to 518 (the other keeps the aspect)
DEPTH_ESTIMATOR = NetworkSpec(
    name="depth_estimator",
    inputs=(TensorSpec("pixel_values", "FP32", ("batch", 3, "depth_height", "depth_width")),),
    outputs=(TensorSpec("predicted_depth", "FP32", ("batch", "depth_height", "depth_width")),),
)

# ControlNets (contract/controlnets.py). One ControlNet graph per ControlNet the deployment serves
# (`export onnx --controlnet NAME=PATH`: model controlnet_NAME, made from the `controlnet` template),
# all with this interface:
# the UNet's inputs and the control image as the endpoint takes it (uint8 RGB, NHWC, at the output
# size; the pipeline's control_image_processor, x / 255 without normalization, runs in the graph) ->
# its residuals at conditioning scale 1 (the loop scales them per request).
CONTROLNET_NAME, UNET_CONTROL_NAME = "controlnet", "unet_control"
CONTROL_RESIDUALS = TensorSpec("control_residuals", COMPUTE, ("batch", "control_size"))
CONTROLNET = NetworkSpec(
    name=CONTROLNET_NAME,
    inputs=(*UNET.inputs, TensorSpec("controlnet_cond", "UINT8", ("batch", "image_height", "image_width", 3))),
    outputs=(CONTROL_RESIDUALS,),
)
# A ControlNet-Union (diffusers' ControlNetUnionModel: xinsir's controlnet-union-sdxl-1.0, ControlNet++):
# one network, several control types (contract/controlnets.py UNION_MODES); a request's modes of one union
# model take ONE pass, as StableDiffusionXLControlNetUnionPipeline's control_mode=[...] does. Each model is
# union_controlnet_NAME, made from the `union_controlnet` template. Beside the UNet's inputs, per row:
# a control image per mode slot, each slot's mode index (-1: an empty slot, when rows of requests with
# fewer modes share a call), each slot's conditioning scale inside the network (1 for a lone mode, whose
# scale the loop applies to the residuals as diffusers does; the mode's scale x its window's keep for
# several), and the row's request: the union's transformer attends across the rows of ONE call of
# diffusers (nn.MultiheadAttention over dim 0), so rows attend only to rows of the same control_groups value.
UNION_CONTROLNET_NAME = "union_controlnet"
UNION_CONTROLNET = NetworkSpec(
    name=UNION_CONTROLNET_NAME,
    inputs=(*UNET.inputs,
            TensorSpec("controlnet_cond", "UINT8", ("batch", "control_modes", "image_height", "image_width", 3)),
            TensorSpec("control_modes", "INT64", ("batch", "control_modes")),
            TensorSpec("control_mode_scales", "FP32", ("batch", "control_modes")),
            TensorSpec("control_groups", "INT64", ("batch",))),
    outputs=(CONTROL_RESIDUALS,),
)
# The UNet that adds ControlNet residuals (rows without a ControlNet send zeros), with the LoRA inputs
# too: the batches in which a request sends ControlNets run it; the others run unet or unet_lora as
# before, paying nothing for the capability.
UNET_CONTROL = NetworkSpec(name=UNET_CONTROL_NAME, inputs=(*UNET_LORA.inputs, CONTROL_RESIDUALS), outputs=UNET.outputs)
CONTROL_NETWORKS = {n.name: n for n in (CONTROLNET, UNION_CONTROLNET, UNET_CONTROL)}

# IP-Adapter image prompts (contract/ip_adapters.py; `export onnx --ip-adapter FILE --image-encoder DIR`).
# The image encoder: CLIPVisionModelWithProjection on the loop's CLIPImageProcessor output (224 x 224,
# computed on the CPU as the safety checker's is), then the adapter's image projection (ImageProjection
# of its image_embeds, or Plus's Resampler of its penultimate hidden states), in the graph: the UNet
# takes tokens, once per request. `ip_negative_tokens`: what diffusers' CFG uses for the negative rows
# (the projection of zeros for the plain adapter, of a zero image's encoding for Plus), a constant of the
# export computed by the same module when it is traced, sent per row as Triton's batching wants.
IP_IMAGE_SIZE = 224  # CLIP ViT-H/14's and bigG/14's image_size: the processor's crop, diffusers' load_ip_adapter's
IP_TOKENS = TensorSpec("ip_tokens", COMPUTE, ("batch", "ip_tokens", "text_dim"))
IMAGE_ENCODER = NetworkSpec(
    name="image_encoder",
    inputs=(TensorSpec("pixel_values", "FP32", ("batch", 3, IP_IMAGE_SIZE, IP_IMAGE_SIZE)),),
    outputs=(IP_TOKENS, TensorSpec("ip_negative_tokens", COMPUTE, ("batch", "ip_tokens", "text_dim"))),
)
# The UNet with every per-request addition: LoRA weights, ControlNet residuals and, per row, image tokens
# and the adapter's scale per cross-attention layer (0 where a layer setting leaves a layer out; rows
# without an image prompt send zero tokens and scales, which add exactly nothing). The batches in which a
# request sends an image prompt run it; the others run unet, unet_lora or unet_control as before, paying
# nothing for the capability (docs/ip-adapter.md: why a fourth graph rather than more inputs on unet_control).
UNET_IP_NAME = "unet_ip"
UNET_IP = NetworkSpec(name=UNET_IP_NAME, inputs=(*UNET_CONTROL.inputs, IP_TOKENS,
                                                 TensorSpec("ip_layer_scales", "FP32", ("batch", "ip_layers"))),
                      outputs=UNET.outputs)
IP_ADAPTER_NETWORKS = (IMAGE_ENCODER.name, UNET_IP_NAME)
# The graphs traced from the base UNet: one set of weights, one precision.
UNET_GRAPHS = (UNET_NAME, UNET_LORA_NAME, UNET_CONTROL_NAME, UNET_IP_NAME)

NETWORKS = {n.name: n for n in (TEXT_ENCODER, UNET, UNET_LORA, VAE_DECODER, PREVIEW_DECODER, VAE_ENCODER, SAFETY_CHECKER,
                                 REFINER_UNET, CONTROLNET, UNION_CONTROLNET, UNET_CONTROL, DEPTH_ESTIMATOR, IMAGE_ENCODER,
                                 UNET_IP)}
# Networks a repository holds only when its export asks for them: an export without a refiner
# writes no refiner_unet model, one without ControlNets no unet_control (a model without its graph
# would fail the server's start). `controlnet` and `union_controlnet` are templates only: each ControlNet
# is its own model, controlnet_NAME or union_controlnet_NAME.
OPTIONAL_NETWORKS = (REFINER_UNET_NAME, CONTROLNET_NAME, UNION_CONTROLNET_NAME, UNET_CONTROL_NAME, DEPTH_ESTIMATOR.name,
                     *IP_ADAPTER_NETWORKS)
CONTROLNET_MODEL_PREFIX = "controlnet_"
UNION_CONTROLNET_MODEL_PREFIX = "union_controlnet_"
CONTROLNET_MODEL_PREFIXES = {CONTROLNET_NAME: CONTROLNET_MODEL_PREFIX, UNION_CONTROLNET_NAME: UNION_CONTROLNET_MODEL_PREFIX}


def controlnet_model(name: str, union: bool = False) -> str:
    """The model that serves the ControlNet (or, `union`, the ControlNet-Union) a request names `name`."""
    return (UNION_CONTROLNET_MODEL_PREFIX if union else CONTROLNET_MODEL_PREFIX) + name


def controlnet_name(model: str) -> str | None:
    """The name requests give the ControlNet a model serves; None for a model that serves none."""
    for prefix in CONTROLNET_MODEL_PREFIXES.values():
        if model.startswith(prefix):
            return model[len(prefix):]
    return None


def network_of(model: str) -> NetworkSpec:
    """The spec of a network model: a ControlNet's model has the controlnet (or union_controlnet) network's."""
    for network, prefix in CONTROLNET_MODEL_PREFIXES.items():
        if model.startswith(prefix):
            return NETWORKS[network]
    return NETWORKS[model]


def served_networks(has_refiner: bool, has_controlnets: bool = False, has_depth_estimator: bool = False,
                    has_ip_adapter: bool = False) -> tuple[str, ...]:
    """The networks an export writes: every one, less the refiner's when its recipe has none, unet_control
    when it has no ControlNet (the ControlNet networks' graphs go to their own models), the depth
    estimator when it has none, and the image encoder and unet_ip without an IP-Adapter."""
    optional = {REFINER_UNET_NAME: has_refiner, CONTROLNET_NAME: has_controlnets, UNION_CONTROLNET_NAME: has_controlnets,
                UNET_CONTROL_NAME: has_controlnets, DEPTH_ESTIMATOR.name: has_depth_estimator,
                **{name: has_ip_adapter for name in IP_ADAPTER_NETWORKS}}
    return tuple(name for name in NETWORKS if optional.get(name, True))

# The scheduler model's tensors that are graph tensors: it receives the text encoder's outputs and
# sends the VAE decoder its latents, so its configs declare them in the graphs' dtype too.
SCHEDULER_GRAPH_TENSORS = {
    "prompt_embeds": TEXT_ENCODER.tensor("prompt_embeds"),
    "pooled_prompt_embeds": TEXT_ENCODER.tensor("pooled_prompt_embeds"),
    "latents": VAE_DECODER.tensor("latents"),
}
SCHEDULER = "scheduler"
# The tokenizer hands the text encoder, beside the token ids, each text's LoRA weights (the
# request's LoRAs, or zeros): its config declares them in the graphs' dtype and widths too.
TOKENIZER = "tokenizer"
TOKENIZER_GRAPH_TENSORS = {name: TEXT_ENCODER.tensor(name) for name in ("lora_down", "lora_up")}
# The continuous-batching engine (serving/engine.py): the scheduler hands requests to it in its
# engine mode; it takes and returns the same graph tensors.
DENOISER = "denoiser"
LOOP_MODELS = (SCHEDULER, DENOISER)
# The streaming endpoint (serving/triton/stream_model.py): decoupled, gRPC streams only; it calls
# tokenizer, text_encoder, denoiser, preview_decoder and vae_decoder through BLS.
SDXL_STREAM = "sdxl_stream"
# The models whose configs carry the recipe (contract/configs.follow_recipe): the loops check requests
# against it, the stream endpoint checks them before any work, the tokenizer encodes the negative
# prompt when the recipe's default guidance means CFG.
RECIPE_MODELS = (*LOOP_MODELS, SDXL_STREAM, TOKENIZER)


def model_tensors(model: str) -> dict[str, TensorSpec]:
    """The spec tensors a model's config declares: a network's own, or those the scheduler (and the
    denoiser) pass on."""
    if model in LOOP_MODELS:
        return dict(SCHEDULER_GRAPH_TENSORS)
    if model == TOKENIZER:
        return dict(TOKENIZER_GRAPH_TENSORS)
    spec = network_of(model)
    return {t.name: t for t in spec.inputs + spec.outputs}


def compute_tensors(model: str) -> tuple[str, ...]:
    """The tensors of a model (a network or the scheduler) that carry the export dtype (COMPUTE)."""
    return tuple(name for name, tensor in model_tensors(model).items() if tensor.dtype == COMPUTE)
