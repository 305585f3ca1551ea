"""The public endpoint `ensemble_sdxl`: inputs, defaults, accepted ranges and `check_inputs`.

The contract is fixed (README, "The endpoint"): one prompt per request, all inputs but `prompt`
optional. Every bad value becomes an `InvalidInput` naming the input, the value and what is
accepted; the Triton models turn it into an INVALID_ARG response for that request alone.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from contract.limits import Limits

MODEL_NAME = "ensemble_sdxl"
SEED_MAX = 2**63 - 1  # INT64; image i uses seed + i, which must stay in range too
RANDOM_SEED_BOUND = 2**32  # an omitted seed is drawn in [0, 2**32): short enough to read and retype
MAX_GUIDANCE = 20.0  # LCM-LoRA works at 1-2; far above that the images are noise


@dataclass(frozen=True)
class EndpointInput:
    name: str
    dtype: str  # Triton type name as in config.pbtxt, without TYPE_
    default: object  # None: required (prompt) or drawn per request (seed)
    meaning: str
    dims: tuple[int, ...] = (1,)  # as config.pbtxt declares them (-1: any)


INPUTS = (
    EndpointInput("prompt", "STRING", None, "UTF-8 text (required)"),
    EndpointInput("negative_prompt", "STRING", "", "used only when CFG is on; empty: zero embeddings"),
    EndpointInput("seed", "INT64", None, "image i uses seed + i; omitted: random"),
    EndpointInput("num_inference_steps", "INT32", 4, "denoising steps (default and range: the recipe's)"),
    EndpointInput("guidance_scale", "FP32", 1.0, "<= 1: no CFG; > 1: CFG (default: the recipe's)"),
    EndpointInput("height", "INT32", 1024, "pixels, a multiple of 64"),
    EndpointInput("width", "INT32", 1024, "pixels, a multiple of 64"),
    EndpointInput("num_images_per_prompt", "INT32", 1, "images in the response"),
)
# Per-request LoRAs (docs/loras.md, serving/loras.py): [K] each, K up to the scheduler's max_loras.
LORA_INPUTS = (
    EndpointInput("lora_names", "STRING", (), "LoRAs from the repository's library (python -m export lora add)", (-1,)),
    EndpointInput("lora_scales", "FP32", 1.0, "one weight per name (diffusers' set_adapters), default 1.0 each", (-1,)),
)
# img2img and inpainting (serving/denoise.py; docs/img2img.md): the image's size is the output's.
IMAGE_INPUTS = (
    EndpointInput("image", "UINT8", None, "init image, RGB [H, W, 3]: img2img, or inpainting with a mask", (-1, -1, 3)),
    EndpointInput("strength", "FP32", 0.8, "(0, 1]: the part of the schedule that runs (default: the deployment's)"),
    EndpointInput("mask", "UINT8", None, "inpainting, [H, W]: 255 repaint, 0 keep (binarized at 128)", (-1, -1)),
)
IMAGE_INPUT_NAMES = tuple(i.name for i in IMAGE_INPUTS)
# What leaves the server (serving/outputs.py; docs/outputs.md): files instead of raw pixels, and
# SDXL's invisible watermark. Checked with the other options, before any work; applied at the end.
OUTPUT_FORMATS = ("raw", "png", "jpeg", "webp")
OUTPUT_INPUTS = (
    EndpointInput("output_format", "STRING", "raw", "raw (the images output only), png, jpeg or webp (encoded_images)"),
    EndpointInput("output_quality", "INT32", 90, "1 to 100: JPEG and WebP quality"),
    EndpointInput("apply_watermark", "BOOL", None, "SDXL's invisible watermark (default: the deployment's)"),
)
OUTPUT_INPUT_NAMES = tuple(i.name for i in OUTPUT_INPUTS)
# The standard recipe's refiner (serving/denoise.py; docs/exporting.md, "The refiner").
REFINER_INPUTS = (
    EndpointInput("high_noise_frac", "FP32", None, "(0, 1]: the part of the schedule the base runs before the refiner "
                  "(default: the recipe's; 1: the base alone); only where a refiner is served"),
)
# ControlNets per request (serving/controlnets.py; docs/controlnet.md): [K] each, K up to max_controlnets.
CONTROL_INPUTS = (
    EndpointInput("control_names", "STRING", (), "ControlNets served here (python -m export onnx --controlnet NAME=PATH)", (-1,)),
    EndpointInput("control_images", "UINT8", None, "one control image per name, RGB [K, H, W, 3] at the output size", (-1, -1, -1, 3)),
    EndpointInput("control_scales", "FP32", 1.0, "diffusers' controlnet_conditioning_scale per name, 0 to 2 (default 1.0)", (-1,)),
    EndpointInput("control_guidance_start", "FP32", 0.0, "where each ControlNet starts, as a fraction of the schedule (default 0)", (-1,)),
    EndpointInput("control_guidance_end", "FP32", 1.0, "where each ControlNet ends (default 1); start < end, both in [0, 1]", (-1,)),
    EndpointInput("control_preprocess", "BOOL", False, "per name: the ControlNet's preprocessor makes the control map "
                  "(default false: the image is the map)", (-1,)),
)
CONTROL_INPUT_NAMES = tuple(i.name for i in CONTROL_INPUTS)
# An IP-Adapter image prompt (serving/ip_adapters.py; docs/ip-adapter.md), where the deployment serves one.
IP_ADAPTER_INPUTS = (
    EndpointInput("ip_adapter_image", "UINT8", None, "the image prompt, RGB [H, W, 3], any size up to the deployment's "
                  "largest output side (CLIP's preprocessing runs on the server)", (-1, -1, 3)),
    EndpointInput("ip_adapter_scale", "FP32", 1.0, "the image prompt's strength, 0 to 2 (0: none; default 1.0)"),
    EndpointInput("ip_adapter_layers", "STRING", "all", "all (default), style, layout or style_and_layout: the layers "
                  "that take it (InstantStyle's settings)"),
)
IP_ADAPTER_INPUT_NAMES = tuple(i.name for i in IP_ADAPTER_INPUTS)
ENDPOINT_INPUTS = (*INPUTS, *LORA_INPUTS, *IMAGE_INPUTS, *OUTPUT_INPUTS, *REFINER_INPUTS, *CONTROL_INPUTS,
                   *IP_ADAPTER_INPUTS)  # ensemble_sdxl's, in its config's order
INPUT_NAMES = tuple(i.name for i in INPUTS)
# The non-text inputs: what check_options reads and the loops (scheduler, denoiser) take.
OPTION_INPUTS = tuple(i.name for i in INPUTS if i.dtype != "STRING")
# What check_options reads: the options, the image inputs (the image gives the size), the output's,
# the refiner's hand-off, and whether a negative prompt came (the base and the refiner treat an empty
# one differently: serving/denoise.py).
CHECKED_INPUTS = (*OPTION_INPUTS, *IMAGE_INPUT_NAMES, *OUTPUT_INPUT_NAMES, "high_noise_frac", "negative_prompt", *CONTROL_INPUT_NAMES,
                  *IP_ADAPTER_INPUT_NAMES)
DEFAULTS = {i.name: i.default for i in (*INPUTS, *OUTPUT_INPUTS)}
OUTPUTS = {"images": ("UINT8", (-1, -1, -1, 3)), "seeds": ("INT64", (-1,)), "encoded_images": ("STRING", (-1,)),
           "nsfw_detected": ("BOOL", (-1,))}
# invisible-watermark's dwtDct needs 256x256 pixels; diffusers skips images under 256 wide.
WATERMARK_MIN_SIDE = 256


class InvalidInput(ValueError):
    def __init__(self, name: str, value: object, accepted: str):
        self.name, self.value, self.accepted = name, value, accepted
        shown = "missing" if value is None else f"{value!r} is not accepted"
        super().__init__(f"{name}: {shown}; expected {accepted}")


class Cancelled(RuntimeError):
    """The request was cancelled (a client's cancel or deadline) while the server worked on it."""


@dataclass(frozen=True)
class OutputOptions:
    """How the final images leave the server: `format` raw or a file format, `quality` for JPEG and
    WebP, `watermark` SDXL's invisible watermark (None: the deployment's setting)."""

    format: str = "raw"
    quality: int = 90
    watermark: bool | None = None

    @property
    def encoded(self) -> bool:
        return self.format != "raw"


@dataclass(frozen=True)
class GenerationOptions:
    """Everything but the texts: what the scheduler needs to run one request."""

    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    num_images_per_prompt: int
    # img2img / inpainting: the part of the schedule that runs; None: text-to-image (no image).
    strength: float | None = None
    inpainting: bool = False  # a mask came with the image
    output: OutputOptions = OutputOptions()
    # The refiner's hand-off: the fraction of the schedule the base runs; None: no refiner served.
    high_noise_frac: float | None = None
    has_negative_prompt: bool = False  # a non-empty negative_prompt came
    # The request's ControlNets (serving.controlnets.ControlSpec), checked; their images stay in the request.
    controls: tuple = ()
    # The request's image prompt (serving.ip_adapters.ImagePromptSpec), checked; its image stays in the request.
    image_prompt: object = None

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def denoising_steps(self) -> int:
        """The UNet steps this request runs: all of them, or the last int(steps * strength) of them."""
        return self.num_inference_steps if self.strength is None else denoising_steps(self.num_inference_steps, self.strength)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images_per_prompt)]


def _one(name: str, array: np.ndarray | None):
    """The single element of an input that the endpoint declares with dims [1]."""
    if array is None:
        return None
    array = np.asarray(array)
    if array.size != 1:
        raise InvalidInput(name, f"<{array.size} values, shape {list(array.shape)}>", "exactly one value (shape [1])")
    return array.reshape(-1)[0]


def check_text(name: str, array: np.ndarray | None, max_bytes: int, required: bool = False) -> str:
    value = _one(name, array)
    if value is None:
        if required:
            raise InvalidInput(name, None, "a UTF-8 string (BYTES, shape [1]); this input is required")
        return DEFAULTS[name]
    if not isinstance(value, (str, bytes, np.bytes_, bytearray)):
        raise InvalidInput(name, value, "UTF-8 text (a BYTES tensor)")
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
    if len(data) > max_bytes:
        raise InvalidInput(name, f"<{len(data)} bytes>", f"UTF-8 text of at most {max_bytes} bytes (max_prompt_bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInput(name, data[:40], f"UTF-8 text ({error.__class__.__name__})") from None


def _integer(name: str, array: np.ndarray | None, low: int, high: int, accepted: str | None = None) -> int:
    value = _one(name, array)
    if value is None:
        return DEFAULTS[name]
    if not isinstance(value, (int, np.integer)) or not low <= int(value) <= high:
        raise InvalidInput(name, value.item() if isinstance(value, np.generic) else value, accepted or f"an integer from {low} to {high}")
    return int(value)


def check_guidance(array: np.ndarray | None, default: float = DEFAULTS["guidance_scale"]) -> float:
    value = _one("guidance_scale", array)
    if value is None:
        return default
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= MAX_GUIDANCE):
        raise InvalidInput("guidance_scale", value, f"a number from 0 to {MAX_GUIDANCE:g} (<= 1: no CFG; LCM-LoRA works best at 1-2)")
    return value


def _steps(array: np.ndarray | None, limits: Limits) -> int:
    """The recipe's step range and default (an omitted value gets the recipe's default)."""
    if _one("num_inference_steps", array) is None:
        return limits.default_steps
    return _integer("num_inference_steps", array, limits.min_steps, limits.max_steps, limits.steps)


def check_preview_every(array: np.ndarray | None, limits: Limits) -> int:
    """The denoiser's `preview_every`: 0 (omitted: no previews) or a preview after every k-th step."""
    value = _one("preview_every", array)
    if value is None:
        return 0
    if not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= limits.max_steps:
        raise InvalidInput("preview_every", value.item() if isinstance(value, np.generic) else value,
                           f"an integer from 0 (no previews) to {limits.max_steps} (a preview after every k-th step)")
    return int(value)


def _size(name: str, array: np.ndarray | None, limits: Limits) -> int:
    value = _integer(name, array, limits.min_size, limits.max_size, limits.sizes)
    if value % limits.size_multiple:
        raise InvalidInput(name, value, limits.sizes)
    return value


def denoising_steps(steps: int, strength: float) -> int:
    """Steps an init image's request runs, as diffusers' img2img and inpaint pipelines count them
    (`get_timesteps`): the last min(int(steps * strength), steps) of the schedule."""
    return min(int(steps * strength), steps)


def check_image(array: np.ndarray | None, limits: Limits) -> tuple[int, int] | None:
    """The init image's (height, width); None without one."""
    if array is None:
        return None
    array = np.asarray(array)
    accepted = f"an RGB image, UINT8 [H, W, 3], H and W each {limits.sizes}"
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InvalidInput("image", f"<{array.dtype} {list(array.shape)}>", accepted)
    height, width = array.shape[:2]
    if not (limits.takes_size(height) and limits.takes_size(width)):
        raise InvalidInput("image", f"<{height}x{width} pixels>", accepted)
    return int(height), int(width)


def _control_size(array: np.ndarray | None, limits: Limits) -> tuple[int, int] | None:
    """The (height, width) of control images that can give the output its size ([K, H, W, 3] uint8, H and W
    sizes the endpoint takes); None otherwise (check_controls then names what is wrong with them)."""
    if array is None:
        return None
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
        return None
    height, width = (int(side) for side in array.shape[1:3])
    return (height, width) if limits.takes_size(height) and limits.takes_size(width) else None


def _image_size(name: str, array: np.ndarray | None, image_side: int) -> int:
    """height or width of a request with an image: the image's, or an equal value sent beside it."""
    value = _one(name, array)
    if value is not None and (not isinstance(value, (int, np.integer)) or int(value) != image_side):
        raise InvalidInput(name, value.item() if isinstance(value, np.generic) else value,
                           f"{image_side} (the image's {name}) or no {name}: the image's size is the output's")
    return image_side


def check_strength(array: np.ndarray | None, steps: int, image: bool, limits: Limits) -> float | None:
    """The strength of a request with an image (None without one); it must leave at least one step."""
    value = _one("strength", array)
    if not image:
        if value is not None:
            raise InvalidInput("strength", float(value), "no strength without an image (strength applies to img2img and inpainting)")
        return None
    shown = "" if value is not None else " (the default)"
    value = limits.default_strength if value is None else float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise InvalidInput("strength", value, "a number in (0, 1]: the part of the schedule that runs (1: all of it)")
    if denoising_steps(steps, value) < 1:
        raise InvalidInput("strength", f"{value:g}{shown} with num_inference_steps {steps}",
                           f"a strength of at least {1 / steps:g} for {steps} step(s): int(steps * strength) steps run, "
                           "and at least one must")
    return value


def check_mask(array: np.ndarray | None, image_size: tuple[int, int] | None) -> bool:
    """Whether the request inpaints: a mask the image's size (255 repaint, 0 keep)."""
    if array is None:
        return False
    array = np.asarray(array)
    if image_size is None:
        raise InvalidInput("mask", f"<{array.dtype} {list(array.shape)}>", "a mask only with an image (inpainting needs both)")
    if array.dtype != np.uint8 or tuple(array.shape) != image_size:
        raise InvalidInput("mask", f"<{array.dtype} {list(array.shape)}>",
                           f"UINT8 [{image_size[0]}, {image_size[1]}], the image's height and width (255 repaint, 0 keep)")
    return True


def check_output(raw: Mapping[str, np.ndarray | None], size: tuple[int, int] | None = None) -> OutputOptions:
    """output_format, output_quality and apply_watermark of one request; `size` (height, width): the
    watermark is refused where diffusers' watermarker would fail (at least 256 wide but under
    256x256 pixels), and skipped, as diffusers does, under 256 wide."""
    value = _one("output_format", raw.get("output_format"))
    fmt = DEFAULTS["output_format"]
    if value is not None:
        text = bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, np.bytes_)) else value
        if not isinstance(text, str) or text.lower() not in OUTPUT_FORMATS:
            raise InvalidInput("output_format", text, f"one of {', '.join(OUTPUT_FORMATS)} (BYTES, shape [1])")
        fmt = text.lower()
    quality = _integer("output_quality", raw.get("output_quality"), 1, 100,
                       "an integer from 1 to 100 (JPEG and WebP quality; default 90)")
    watermark = _one("apply_watermark", raw.get("apply_watermark"))
    if watermark is not None and not isinstance(watermark, (bool, np.bool_)):
        raise InvalidInput("apply_watermark", watermark.item() if isinstance(watermark, np.generic) else watermark,
                           "true or false (BOOL, shape [1])")
    watermark = None if watermark is None else bool(watermark)
    if watermark and size is not None and size[1] >= WATERMARK_MIN_SIDE and size[0] * size[1] < WATERMARK_MIN_SIDE**2:
        raise InvalidInput("apply_watermark", f"true for {size[0]}x{size[1]} images",
                           f"images of at least {WATERMARK_MIN_SIDE}x{WATERMARK_MIN_SIDE} pixels for the watermark "
                           f"(under {WATERMARK_MIN_SIDE} wide it is skipped, as diffusers does)")
    return OutputOptions(fmt, quality, watermark)


def check_high_noise_frac(array: np.ndarray | None, limits: Limits) -> float | None:
    """Where the refiner takes over: the request's, else the recipe's; None where no refiner is served."""
    value = _one("high_noise_frac", array)
    if value is None:
        return limits.default_high_noise_frac
    value = float(f"{float(value):.7g}")  # FP32 as sent: -0.2, not -0.20000000298023224
    if not limits.has_refiner:
        raise InvalidInput("high_noise_frac", value, f"no high_noise_frac: no refiner is served here (recipe {limits.recipe}; "
                           "a repository exported with --preset sdxl-base-refiner or --refiner serves one)")
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise InvalidInput("high_noise_frac", value, "a number in (0, 1]: the part of the schedule the base runs before the "
                           f"refiner (1: the base alone; default {limits.default_high_noise_frac:g})")
    return value


def check_prompts(raw: Mapping[str, np.ndarray | None], limits: Limits = Limits()) -> tuple[str, str]:
    """(prompt, negative_prompt) of one request; the prompt is required. Sizes first: an oversize
    text is refused before it is decoded or tokenized."""
    return (check_text("prompt", raw.get("prompt"), limits.max_prompt_bytes, required=True),
            check_text("negative_prompt", raw.get("negative_prompt"), limits.max_prompt_bytes))


def check_options(raw: Mapping[str, np.ndarray | None], limits: Limits, draw_seed=secrets.randbelow,
                  controlnets: Mapping | None = None, ip_adapter=None) -> GenerationOptions:
    """Validate one request's non-text inputs (arrays as Triton delivers them; None or absent: omitted).
    `controlnets`: the ControlNets served ({name: contract.controlnets.ServedControl}, serving.controlnets.served_controlnets);
    `ip_adapter`: the IP-Adapter served (serving.ip_adapters.ServedIPAdapter), None where none is."""
    from .controlnets import check_controls
    from .ip_adapters import check_image_prompt

    get = raw.get
    num_images = _integer("num_images_per_prompt", get("num_images_per_prompt"), 1, limits.max_images)
    seed = _integer("seed", get("seed"), 0, SEED_MAX - (num_images - 1),
                    f"an integer from 0 to 2**63 - {num_images} (image i uses seed + i)")
    image = check_image(get("image"), limits)
    controls = _control_size(get("control_images"), limits) if image is None else None
    if image is None and controls is not None:  # as diffusers' ControlNet pipelines: the control images' size
        height = _size("height", get("height"), limits) if _one("height", get("height")) is not None else controls[0]
        width = _size("width", get("width"), limits) if _one("width", get("width")) is not None else controls[1]
    elif image is None:
        height, width = _size("height", get("height"), limits), _size("width", get("width"), limits)
    else:
        height, width = _image_size("height", get("height"), image[0]), _image_size("width", get("width"), image[1])
    steps = _steps(get("num_inference_steps"), limits)
    return GenerationOptions(
        seed=draw_seed(RANDOM_SEED_BOUND) if seed is None else seed,
        num_inference_steps=steps,
        guidance_scale=check_guidance(get("guidance_scale"), limits.default_guidance),
        height=height,
        width=width,
        num_images_per_prompt=num_images,
        strength=check_strength(get("strength"), steps, image is not None, limits),
        inpainting=check_mask(get("mask"), image),
        output=check_output(raw, (height, width)),
        high_noise_frac=check_high_noise_frac(get("high_noise_frac"), limits),
        has_negative_prompt=bool(check_text("negative_prompt", get("negative_prompt"), limits.max_prompt_bytes)),
        controls=check_controls(raw, limits, controlnets or {}, (height, width)),
        image_prompt=check_image_prompt(raw, limits, ip_adapter),
    )
