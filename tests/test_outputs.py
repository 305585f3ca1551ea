"""What leaves the server (serving/outputs.py), without a server: SDXL's watermark equals diffusers'
StableDiffusionXLWatermarker bit for bit, PNG is lossless, JPEG and WebP close at their quality, and
the endpoint's checks of output_format, output_quality and apply_watermark. Served: test_outputs_served.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from contract.limits import Limits
from serving.endpoint import InvalidInput, OutputOptions, check_options, check_output
from serving.outputs import WATERMARK_BITS, Finisher, Watermarker, encode_image, parse_watermark_setting


def smooth_image(height: int, width: int, seed: int = 0, count: int = 1) -> np.ndarray:
    """uint8 [count, H, W, 3]: gradients and a few discs, what a photo's statistics look like more
    than noise does (JPEG's error on noise says little)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        image = np.stack([np.sin(6 * a * x + 3 * b * y), np.cos(5 * b * x - 4 * c * y), np.sin(7 * c * (x + y))], -1)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1, 3)
            image[(y - cy) ** 2 + (x - cx) ** 2 < (0.2 * r) ** 2] = rng.uniform(-1, 1, 3)
        images.append(((image * 0.5 + 0.5) * 255).round().astype(np.uint8))
    return np.stack(images)


def diffusers_watermark(images: np.ndarray) -> np.ndarray:
    """diffusers' pipeline end: the watermarker on the images in [-1, 1], then the image processor's uint8."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

    pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    marked = VaeImageProcessor().postprocess(StableDiffusionXLWatermarker().apply_watermark(pixels), output_type="np")
    return (marked * 255).round().astype(np.uint8)


@pytest.mark.parametrize("shape", [(2, 256, 384), (1, 512, 512)], ids=["2x256x384", "512x512"])
def test_watermark_equals_diffusers_sdxl_watermarker(shape):
    from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS as diffusers_bits

    assert WATERMARK_BITS == diffusers_bits and len(WATERMARK_BITS) == 48
    images = smooth_image(*shape[1:], count=shape[0])
    marked = Watermarker().apply(images)
    assert np.array_equal(marked, diffusers_watermark(images))
    assert not np.array_equal(marked, images)  # it did something


def test_watermark_skips_what_diffusers_skips():
    narrow = smooth_image(512, 192)  # under 256 wide: diffusers returns the images as they are
    assert np.array_equal(Watermarker().apply(narrow), narrow)
    assert np.array_equal(diffusers_watermark(narrow), narrow)


@pytest.mark.parametrize("size", [(512, 512), (1024, 1024)])
def test_png_is_lossless_and_jpeg_webp_close(size):
    image = smooth_image(*size)[0]
    png = encode_image(image, "png", 90)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and np.array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
    for fmt, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
        sizes = []
        for quality in (50, 90):
            data = encode_image(image, fmt, quality)
            assert data.startswith(magic)
            decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
            assert decoded.shape == image.shape
            psnr = 10 * np.log10(255**2 / np.mean((decoded - image) ** 2))
            assert psnr > (30 if quality == 90 else 25), (fmt, quality, psnr)
            sizes.append(len(data))
        assert sizes[0] < sizes[1] < len(png), (fmt, sizes, len(png))


def test_finisher_applies_the_deployments_setting_unless_the_request_says(monkeypatch):
    images = smooth_image(256, 256)
    marked = Watermarker().apply(images)
    on, off = Finisher(default_watermark=True), Finisher(default_watermark=False)
    assert np.array_equal(on.finish(images, OutputOptions())[0], marked)
    assert np.array_equal(on.finish(images, OutputOptions(watermark=False))[0], images)
    assert np.array_equal(off.finish(images, OutputOptions(watermark=True))[0], marked)
    finished, files, flags = off.finish(images, OutputOptions())
    assert finished is images and files is None and flags is None  # raw, no watermark: untouched
    finished, files, _ = off.finish(images, OutputOptions("png", 90, True))
    assert len(files) == 1 and np.array_equal(np.asarray(Image.open(io.BytesIO(files[0]))), marked[0])
    assert parse_watermark_setting("", "postprocess") is False and parse_watermark_setting("True", "postprocess") is True
    with pytest.raises(ValueError, match=r"^postprocess: parameter apply_watermark='yes': expected true or false$"):
        parse_watermark_setting("yes", "postprocess")
    monkeypatch.setenv("SDXL_APPLY_WATERMARK", "true")  # the chart's outputs.applyWatermark wins
    assert parse_watermark_setting("false", "sdxl_stream") is True
    monkeypatch.setenv("SDXL_APPLY_WATERMARK", "on")
    with pytest.raises(ValueError, match=r"^sdxl_stream: \$SDXL_APPLY_WATERMARK='on': expected true or false$"):
        parse_watermark_setting("false", "sdxl_stream")


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=object)


def test_output_options_defaults_and_values():
    assert check_output({}) == OutputOptions("raw", 90, None)
    assert check_output({"output_format": text("JPEG"), "output_quality": np.array([1], np.int32),
                         "apply_watermark": np.array([True])}, (512, 512)) == OutputOptions("jpeg", 1, True)
    options = check_options({"output_format": text("webp"), "height": np.array([256], np.int32)}, Limits(min_size=128))
    assert options.output == OutputOptions("webp", 90, None) and options.output.encoded


BAD = {
    "gif": ({"output_format": text("gif")}, "output_format: 'gif' is not accepted; expected one of raw, png, jpeg, webp"),
    "quality 0": ({"output_quality": np.array([0], np.int32)}, "output_quality: 0 is not accepted; expected an integer from 1 to 100"),
    "quality 101": ({"output_quality": np.array([101], np.int32)}, "output_quality: 101 is not accepted"),
    "two formats": ({"output_format": np.array([b"png", b"jpeg"], dtype=object)}, "output_format: '<2 values, shape [2]>'"),
    "watermark as a number": ({"apply_watermark": np.array([1], np.int32)}, "apply_watermark: 1 is not accepted; expected true or false"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_output_options_name_the_input(case):
    raw, message = BAD[case]
    with pytest.raises(InvalidInput) as refused:
        check_output(raw)
    assert str(refused.value).startswith(message), str(refused.value)


def test_watermark_refused_where_diffusers_encoder_fails_and_skipped_under_256_wide():
    limits = Limits(min_size=128)
    small = {"apply_watermark": np.array([True]), "height": np.array([128], np.int32), "width": np.array([256], np.int32)}
    with pytest.raises(InvalidInput, match=r"^apply_watermark: 'true for 128x256 images' is not accepted; expected images "
                                           r"of at least 256x256 pixels"):
        check_options(small, limits)
    narrow = {**small, "height": np.array([256], np.int32), "width": np.array([128], np.int32)}
    assert check_options(narrow, limits).output.watermark is True  # skipped, as diffusers does
