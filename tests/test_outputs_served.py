"""Encoded images and the watermark on the real tritonserver (CPU variant, tiny model), over HTTP
and gRPC: PNG decodes to exactly the raw images, JPEG and WebP close to them, a client that asks
only for encoded_images is sent no raw pixels, the watermark equals diffusers' on the served image,
the stream's final images finished as the ensemble's, bad inputs refused naming the input, the CLI."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from test_outputs import diffusers_watermark

from client import ClientError, generate
from client.__main__ import main as client_main

PROTOCOLS = ["http", "grpc"]
CASE = dict(prompt="a lighthouse at dusk", seed=11, num_inference_steps=2, height=256, width=256)


def ask(server, protocol="grpc", **options):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    options = {**CASE, **options}
    return generate(options.pop("prompt"), url=url, protocol=protocol, **options)


def decoded(files: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in files])


def both_outputs(server, protocol: str, fmt: str):
    """tritonclient's result of one 2-image CASE request asking for images and encoded_images."""
    from client import _module, build_inputs

    module = _module(protocol)
    options = {k: v for k, v in CASE.items() if k != "prompt"}
    inputs = build_inputs(protocol, CASE["prompt"], num_images_per_prompt=2, output_format=fmt, **options)
    client = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    try:
        return client.infer("ensemble_sdxl", inputs, outputs=[module.InferRequestedOutput(n) for n in ("images", "encoded_images")])
    finally:
        client.close()


@pytest.fixture(scope="module")
def raw(triton):
    """The raw images of CASE with two images, as every test compares against them."""
    return ask(triton, num_images_per_prompt=2).images


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_png_is_the_raw_images_and_jpeg_webp_are_close(triton, raw, protocol):
    png = ask(triton, protocol, num_images_per_prompt=2, output_format="png")
    assert png.images is None and len(png.encoded_images) == 2  # only the files were asked for
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in png.encoded_images)
    assert np.array_equal(decoded(png.encoded_images), raw)
    both = both_outputs(triton, protocol, "png")  # one request asking for both: the file is its own pixels
    assert np.array_equal(decoded(both.as_numpy("encoded_images").tolist()), both.as_numpy("images"))
    for fmt in ("jpeg", "webp"):
        files = ask(triton, protocol, num_images_per_prompt=2, output_format=fmt, output_quality=95).encoded_images
        difference = np.abs(decoded(files).astype(int) - raw.astype(int))
        # The tiny model's images are noise, JPEG's and WebP's worst case: close on average only.
        assert difference.mean() < 12, (fmt, difference.mean())
        assert len(files[0]) < raw[0].nbytes


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_only_encoded_images_asked_for_sends_no_raw_pixels(triton, protocol):
    """tritonclient directly: the response carries encoded_images and nothing else."""
    from client import _module, build_inputs

    module = _module(protocol)
    inputs = build_inputs(protocol, CASE["prompt"], seed=1, num_inference_steps=1, height=128, width=128, output_format="jpeg")
    client = module.InferenceServerClient(triton.grpc_url if protocol == "grpc" else triton.http_url)
    try:
        result = client.infer("ensemble_sdxl", inputs, outputs=[module.InferRequestedOutput("encoded_images")])
    finally:
        client.close()
    response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
    assert [output["name"] for output in response["outputs"]] == ["encoded_images"]
    assert result.as_numpy("images") is None and result.as_numpy("encoded_images").shape == (1,)
    client = module.InferenceServerClient(triton.grpc_url if protocol == "grpc" else triton.http_url)
    try:  # every output asked for (no outputs named: perf_analyzer's way): the pixels and their file
        everything = client.infer("ensemble_sdxl", inputs)
    finally:
        client.close()
    assert everything.as_numpy("images").shape == (1, 128, 128, 3) and everything.as_numpy("encoded_images").shape == (1,)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_request_without_output_inputs_is_answered_as_before(triton, raw, protocol):
    plain = ask(triton, protocol, num_images_per_prompt=2)
    assert plain.encoded_images is None and np.array_equal(plain.images, raw)
    assert np.array_equal(ask(triton, protocol, num_images_per_prompt=2, output_format="raw").images, raw)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_watermark_equals_diffusers_on_the_served_image(triton, raw, protocol):
    marked = ask(triton, protocol, num_images_per_prompt=2, apply_watermark=True).images
    assert np.array_equal(marked, diffusers_watermark(raw))
    as_png = ask(triton, protocol, num_images_per_prompt=2, apply_watermark=True, output_format="png").encoded_images
    assert np.array_equal(decoded(as_png), marked)  # watermarked, then encoded
    assert np.array_equal(ask(triton, protocol, num_images_per_prompt=2, apply_watermark=False).images, raw)  # the default: off


def test_stream_final_images_finished_as_the_ensembles(triton, raw):
    updates = list(ask(triton, stream=True, preview_every=1, num_images_per_prompt=2, output_format="png", apply_watermark=True))
    assert [u.step for u in updates] == [1, 2]
    assert updates[0].encoded_images is None and updates[0].images.shape == (2, 256, 256, 3)  # the preview: raw pixels
    final = updates[-1]
    assert np.array_equal(decoded(final.encoded_images), diffusers_watermark(raw))
    assert np.array_equal(final.images, diffusers_watermark(raw))  # asked for every output: both
    plain = list(ask(triton, stream=True, num_images_per_prompt=2, apply_watermark=True))[-1]
    assert plain.encoded_images is None and np.array_equal(plain.images, diffusers_watermark(raw))


BAD = {  # what is sent -> the message (both protocols)
    "format gif": (dict(output_format="gif"), "output_format: 'gif' is not accepted; expected one of raw, png, jpeg, webp"),
    "quality 0": (dict(output_format="jpeg", output_quality=0), "output_quality: 0 is not accepted; expected an integer from 1 to 100"),
    "quality 101": (dict(output_quality=101), "output_quality: 101 is not accepted"),
    "watermark on 128x256": (dict(height=128, width=256, apply_watermark=True), "apply_watermark: 'true for 128x256 images'"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", BAD)
def test_bad_output_inputs_are_refused_naming_the_input(triton, protocol, case):
    sent, message = BAD[case]
    for stream in ([False, True] if protocol == "grpc" else [False]):
        with pytest.raises(ClientError) as refused:
            result = ask(triton, protocol, num_inference_steps=1, stream=stream, **sent)
            list(result) if stream else None
        if not stream:  # a stream's error arrives in its callback, without a status code
            assert refused.value.status in ("400", "StatusCode.INVALID_ARGUMENT"), (refused.value.status, str(refused.value))
        assert message in str(refused.value), str(refused.value)
    assert ask(triton, protocol, num_inference_steps=1, height=128, width=128).images.shape == (1, 128, 128, 3)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_apply_watermark_of_another_type_is_refused_by_triton_naming_it(triton, protocol):
    """The ensemble declares BOOL: Triton itself refuses an INT32, before any model runs."""
    from client import _module, build_inputs

    module = _module(protocol)
    inputs = build_inputs(protocol, CASE["prompt"], num_inference_steps=1, height=128, width=128)
    wrong = module.InferInput("apply_watermark", [1], "INT32")
    wrong.set_data_from_numpy(np.array([1], np.int32))
    client = module.InferenceServerClient(triton.grpc_url if protocol == "grpc" else triton.http_url)
    try:
        with pytest.raises(Exception) as refused:
            client.infer("ensemble_sdxl", inputs + [wrong])
    finally:
        client.close()
    assert "inference input 'apply_watermark' data-type is 'INT32', but model 'ensemble_sdxl' expects 'BOOL'" in str(refused.value)
    assert str(refused.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT")


def test_client_cli_format_follows_the_extension(triton, tmp_path, capsys):
    url = ["--url", triton.http_url, "--seed", "5", "--steps", "1", "--height", "128", "--width", "192"]
    expected = ask(triton, "http", prompt="a cat", seed=5, num_inference_steps=1, height=128, width=192).images[0]
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.jpeg", "JPEG"), ("d.webp", "WEBP")):
        assert client_main(["a cat", *url, "-o", str(tmp_path / name), "--quality", "80"]) == 0
        with Image.open(tmp_path / name) as image:
            assert image.format == fmt and image.size == (192, 128)
            if fmt == "PNG":
                assert np.array_equal(np.asarray(image), expected)
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'b.jpg'}  seed 5  192x128  " in printed and " bytes" in printed
    with pytest.raises(SystemExit) as refused:
        client_main(["a cat", *url, "-o", str(tmp_path / "e.gif")])
    assert refused.value.code == 2
    assert "-o" in capsys.readouterr().err
