"""What a deployment accepts: the endpoint's limits, kept as the `scheduler` model's config parameters.

The production values follow the TensorRT engines' profiles (`python -m export engines` builds them
from these), so the engines, the configs and the endpoint's checks cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


MIB = 1 << 20
# Image inputs a request may carry besides its init image and mask (control images, an image prompt),
# counted at the largest size in the request-size bound (max_request_bytes).
REQUEST_IMAGE_ROOM = 4
# A LoRA's or ControlNet's name in a request: bytes of UTF-8 at most (contract/loras.py's names are shorter).
MAX_NAME_BYTES = 128


@dataclass(frozen=True)
class Limits:
    min_size: int = 512
    max_size: int = 1536
    size_multiple: int = 64
    # The recipe's (contract/recipes.py): what the export wrote into the scheduler's parameters.
    min_steps: int = 1
    max_steps: int = 8
    default_steps: int = 4
    default_guidance: float = 1.0
    recipe: str = "lcm-sdxl"
    max_images: int = 4
    # Bytes of UTF-8, each of prompt and negative_prompt, checked before tokenizing. CLIP reads 77
    # tokens (about 300 bytes of English); 4 KiB leaves room for long prompts in any script, which
    # the tokenizers truncate as diffusers does, and refuses megabyte texts before any work.
    max_prompt_bytes: int = 4096
    # Per-request LoRAs (contract/loras.py): names per request, the rank of one LoRA in the library
    # (the engines' profiles allow max_loras x max_lora_rank stacked), and |scale|.
    max_loras: int = 4
    max_lora_rank: int = 64
    max_lora_scale: float = 4.0
    # img2img / inpainting: the strength of a request that sends an image and no strength
    # (Replicate's and diffusers' img2img default).
    default_strength: float = 0.8
    # The recipe's refiner hand-off (contract/recipes.py): the high_noise_frac of a request that sends
    # none; None: the deployment serves no refiner (a request's high_noise_frac is refused).
    default_high_noise_frac: float | None = None
    # ControlNets per request (control_names), each with a control image at the output size: inside
    # the request-size bound's image room (REQUEST_IMAGE_ROOM, one left for an image prompt).
    max_controlnets: int = 3

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "Limits":
        """From a model config's `parameters` (string values); unknown keys are ignored."""
        values: dict = {}
        for key in ("min_size", "max_size", "max_images", "max_prompt_bytes", "min_steps", "max_steps", "default_steps",
                    "max_loras", "max_lora_rank", "max_controlnets"):
            if key in parameters:
                try:
                    values[key] = int(parameters[key])
                except ValueError:
                    raise ValueError(f"model config parameter {key}={parameters[key]!r}: expected an integer") from None
        for key in ("default_guidance", "max_lora_scale", "default_strength"):
            if key in parameters:
                try:
                    values[key] = float(parameters[key])
                except ValueError:
                    raise ValueError(f"model config parameter {key}={parameters[key]!r}: expected a number") from None
        if parameters.get("recipe"):
            values["recipe"] = parameters["recipe"]
        if parameters.get("high_noise_frac"):
            try:
                values["default_high_noise_frac"] = float(parameters["high_noise_frac"])
            except ValueError:
                raise ValueError(f"model config parameter high_noise_frac={parameters['high_noise_frac']!r}: expected "
                                 "empty (no refiner) or a number in (0, 1]") from None
        limits = cls(**values)
        if not (limits.size_multiple <= limits.min_size <= limits.max_size) or limits.min_size % limits.size_multiple:
            raise ValueError(f"model config parameters min_size={limits.min_size}, max_size={limits.max_size}: "
                             f"expected multiples of {limits.size_multiple} with min_size <= max_size")
        for key in ("max_images", "max_prompt_bytes", "max_lora_rank"):
            if getattr(limits, key) < 1:
                raise ValueError(f"model config parameter {key}={getattr(limits, key)}: expected at least 1")
        if limits.max_loras < 0 or not limits.max_lora_scale > 0:
            raise ValueError(f"model config parameters max_loras={limits.max_loras}, max_lora_scale={limits.max_lora_scale:g}: "
                             "expected max_loras >= 0 and max_lora_scale > 0")
        if not 0 <= limits.max_controlnets <= REQUEST_IMAGE_ROOM - 1:
            raise ValueError(f"model config parameter max_controlnets={limits.max_controlnets}: expected 0 to "
                             f"{REQUEST_IMAGE_ROOM - 1} (the request-size bound holds {REQUEST_IMAGE_ROOM} images beside the init image)")
        if not 1 <= limits.min_steps <= limits.default_steps <= limits.max_steps:
            raise ValueError(f"model config parameters min_steps={limits.min_steps}, default_steps={limits.default_steps}, "
                             f"max_steps={limits.max_steps}: expected 1 <= min_steps <= default_steps <= max_steps")
        if not 0.0 < limits.default_strength <= 1.0:
            raise ValueError(f"model config parameter default_strength={limits.default_strength:g}: expected a number in (0, 1]")
        frac = limits.default_high_noise_frac
        if frac is not None and not 0.0 < frac <= 1.0:
            raise ValueError(f"model config parameter high_noise_frac={frac:g}: expected empty (no refiner) or a number in (0, 1]")
        if not 0.0 <= limits.default_guidance <= 20.0:
            raise ValueError(f"model config parameter default_guidance={limits.default_guidance:g}: expected 0 to 20")
        return limits

    @property
    def max_stacked_rank(self) -> int:
        """The rank of one request's LoRAs stacked at most: what the engines' lora_rank profile spans."""
        return max(1, self.max_loras * self.max_lora_rank)

    @property
    def max_request_bytes(self) -> int:
        """The largest legal request's body, rounded up to a MiB with a quarter of margin: what
        `--http-max-input-size` is set to where the Triton has it (25.06 and later). Four RGB images at
        the largest size (room for the image inputs beside the init image: control images, an image
        prompt), the init image and its mask, both prompts and the LoRA names; the scalars fit the margin."""
        pixels = self.max_size * self.max_size
        images = (REQUEST_IMAGE_ROOM + 1) * pixels * 3 + pixels
        text = 2 * self.max_prompt_bytes + (self.max_loras + self.max_controlnets) * MAX_NAME_BYTES
        return -(-int((images + text) * 1.25) // MIB) * MIB

    @property
    def steps(self) -> str:
        return f"an integer from {self.min_steps} to {self.max_steps} (recipe {self.recipe})"

    @property
    def has_refiner(self) -> bool:
        return self.default_high_noise_frac is not None

    def takes_size(self, side: int) -> bool:
        """Whether `side` (pixels) is a height or width the endpoint takes (`sizes`)."""
        return self.min_size <= side <= self.max_size and side % self.size_multiple == 0

    @property
    def sizes(self) -> str:
        return f"a multiple of {self.size_multiple} from {self.min_size} to {self.max_size}"
