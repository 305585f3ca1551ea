"""The final images on their way out: the safety checker's flags, SDXL's invisible watermark, black
where the policy blacks flagged images out, then one file per image.

Both endpoints finish their images here (the `postprocess` model of `ensemble_sdxl`, and
`sdxl_stream` in its own process), so a request's bytes do not depend on the endpoint.

- Watermark: diffusers' `StableDiffusionXLWatermarker`, the same bits and the same arithmetic
  (invisible-watermark's dwtDct on the float pixels, BGR), from uint8 pixels instead of the VAE's
  floats: diffusers' pipeline quantizes after the watermark, this server before and after it.
- Encoding on the CPU with Pillow, whose wheels carry libjpeg-turbo, libwebp and zlib. PNG is
  lossless (it decodes to the raw pixels); JPEG and WebP take `quality`.
"""

from __future__ import annotations

import io
import os

import numpy as np

from serving.endpoint import WATERMARK_MIN_SIDE, OutputOptions
from serving.safety import POLICIES, SafetyChecker

# Stability AI's generative-models (scripts/demo/streamlit_helpers.py), as diffusers copies it
# (pipelines/stable_diffusion_xl/watermark.py): 48 bits.
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = [int(bit) for bit in bin(WATERMARK_MESSAGE)[2:]]
WATERMARK_METHOD = "dwtDct"

# Pillow's format names and the options each is written with. PNG: zlib level 1, the fastest;
# benchmarks/outputs.py measured what the higher levels save on SDXL-sized images.
PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
PNG_COMPRESS_LEVEL = 1


class Watermarker:
    """SDXL's invisible watermark on uint8 RGB images [N, H, W, 3]. Images under 256 wide pass
    unchanged, as in diffusers; so do those under 256x256 pixels, on which diffusers' encoder raises
    (a request that asks for the watermark on them is refused: serving.endpoint.check_output)."""

    def __init__(self):
        from imwatermark import WatermarkEncoder  # OpenCV and PyWavelets: loaded only where used

        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bits", WATERMARK_BITS)

    def apply(self, images: np.ndarray) -> np.ndarray:
        height, width = images.shape[1:3]
        if width < WATERMARK_MIN_SIDE or height * width < WATERMARK_MIN_SIDE**2:  # the second: the encoder raises
            return images
        # diffusers' steps in float32, from the pixels as its image processor would hold them in [-1, 1]:
        # to [0, 255], BGR, encode, back to [-1, 1] clamped, then the image processor's uint8 rounding.
        pixels = images.astype(np.float32) / np.float32(127.5) - np.float32(1)
        pixels = np.float32(255) * (pixels / np.float32(2) + np.float32(0.5))
        marked = np.asarray([self.encoder.encode(np.ascontiguousarray(image[:, :, ::-1]), WATERMARK_METHOD)[:, :, ::-1]
                             for image in pixels], dtype=np.float32)
        marked = np.clip(np.float32(2) * (marked / np.float32(255) - np.float32(0.5)), -1, 1)
        return np.rint(np.clip(marked / np.float32(2) + np.float32(0.5), 0, 1) * np.float32(255)).astype(np.uint8)


def encode_image(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """One uint8 RGB image [H, W, 3] as a complete file."""
    from PIL import Image

    options = {"compress_level": PNG_COMPRESS_LEVEL} if fmt == "png" else {"quality": quality}
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, PILLOW_FORMATS[fmt], **options)
    return buffer.getvalue()


class Finisher:
    """What an endpoint does to its final images: `finish(images, options)` -> (images, files or None,
    nsfw flags or None). `default_watermark`: the deployment's setting, for a request that does not
    say. `safety`: the deployment's safety checker (None: off) and `distances`, the function that runs
    its graph (pixel values -> concept and special-care distances: a BLS call to `safety_checker`)."""

    def __init__(self, default_watermark: bool = False, safety: SafetyChecker | None = None, distances=None):
        if (safety is None) != (distances is None):
            raise ValueError("internal: a safety checker needs the function that runs its graph, and only it")
        self.default_watermark = default_watermark
        self.safety, self.distances = safety, distances
        # invisible-watermark imports PyTorch (its rivaGan method): about 2 s and 200 MB per process.
        # Paid at load where the deployment watermarks every image; else by the first request that asks.
        self._watermarker: Watermarker | None = Watermarker() if default_watermark else None

    def watermarks(self, options: OutputOptions) -> bool:
        return self.default_watermark if options.watermark is None else options.watermark

    def changes(self, options: OutputOptions) -> bool:
        """Whether finish() does anything: else the endpoint passes the decoder's tensor on as it came."""
        return options.encoded or self.watermarks(options) or self.safety is not None

    def finish(self, images: np.ndarray, options: OutputOptions) -> tuple[np.ndarray, list[bytes] | None, np.ndarray | None]:
        # 1. check the images as decoded (diffusers checks before its watermark, which SDXL adds after)
        flags = self.safety.flags(*self.distances(self.safety.pixel_values(images))) if self.safety else None
        # 2. watermark, 3. black out what the policy blacks out (black stays black), 4. encode
        if self.watermarks(options):
            if self._watermarker is None:
                self._watermarker = Watermarker()
            images = self._watermarker.apply(images)
        if flags is not None:
            images = self.safety.blackout(images, flags)
        files = [encode_image(image, options.format, options.quality) for image in images] if options.encoded else None
        return images, files, flags


# The deployment's settings from the environment (the Helm chart's outputs.applyWatermark and
# outputs.safetyChecker): each wins over its config parameter in postprocess and sdxl_stream, so one
# value sets both endpoints of a repository built elsewhere.
WATERMARK_ENV = "SDXL_APPLY_WATERMARK"
SAFETY_ENV = "SDXL_SAFETY_CHECKER"


def deployment_setting(env: str, parameter: str, value: str, accepted: tuple[str, ...], default: str, model: str) -> str:
    """$`env` when set, else the config parameter's `value` (empty: `default`), one of `accepted`."""
    source, value = (f"${env}", os.environ[env]) if os.environ.get(env) else (f"parameter {parameter}", value)
    setting = (value or default).strip().lower()
    if setting not in accepted:
        raise ValueError(f"{model}: {source}={value!r}: expected {', '.join(accepted[:-1])} or {accepted[-1]}")
    return setting


def parse_watermark_setting(value: str, model: str) -> bool:
    """The deployment's watermark setting: true or false (empty: false)."""
    return deployment_setting(WATERMARK_ENV, "apply_watermark", value, ("true", "false"), "false", model) == "true"


def parse_safety_setting(value: str, model: str) -> str:
    """The deployment's safety checker policy: off, flag or black (empty: off)."""
    return deployment_setting(SAFETY_ENV, "safety_checker", value, POLICIES, "off", model)
