"""The standard recipe with the refiner, end to end: `python -m export onnx --preset sdxl-base-refiner`
on the tiny pipeline (its refiner/ taken as the model directory's own), served by a real tritonserver,
against diffusers' "ensemble of experts" (tests/reference.py) over HTTP and gRPC, on the streaming
endpoint (the continuous-batching engine), and every bad high_noise_frac named."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import running
from reference import diffusers_ensemble_images

from client import ClientError, generate, info
from contract import layout
from contract.configs import CPU_DTYPE, parameters, read_config
from contract.networks import REFINER_UNET_NAME
from export.cli import main as export_main
from export.sources import ExportError, Sources, load_pipeline, load_refiner
from serving.server import TritonServer, free_ports

PIXEL_MAX, PIXEL_MEAN = 1, 0.01  # served (ONNX Runtime, fp32) against diffusers (PyTorch, fp32)


@pytest.fixture(scope="module")
def refiner_repository(tiny_dir, tmp_path_factory):
    repository = tmp_path_factory.mktemp("refiner_repo")
    assert export_main(["onnx", "--preset", "sdxl-base-refiner", "--model", str(tiny_dir), "--vae", str(tiny_dir / "alt_vae"),
                        "--dtype", CPU_DTYPE, "--out", str(repository)]) == 0
    return repository


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The tiny base (no LoRA: the preset has none), its alt VAE, and the refiner UNet, in fp32."""
    loaded = load_pipeline(Sources(str(tiny_dir), vae=str(tiny_dir / "alt_vae"), refiner=str(tiny_dir / "refiner")), CPU_DTYPE)
    return loaded.pipe


@pytest.fixture(scope="module")
def refiner_server(refiner_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("refiner_server") / "tritonserver.log"
    with running(TritonServer(refiner_repository, "cpu", *free_ports(3), log_file=log)) as server:
        yield server


def expected(pipe, prompt, **kwargs) -> np.ndarray:
    return diffusers_ensemble_images(pipe, pipe.refiner_unet, prompt, **kwargs)


def assert_close(served: np.ndarray, wanted: np.ndarray) -> None:
    assert served.shape == wanted.shape
    difference = np.abs(served.astype(int) - wanted.astype(int))
    assert difference.max() <= PIXEL_MAX and difference.mean() <= PIXEL_MEAN, (difference.max(), difference.mean())


def test_export_writes_the_refiner_and_its_recipe(refiner_repository, tiny_dir):
    assert layout.onnx_path(refiner_repository, REFINER_UNET_NAME).exists()
    params = parameters(read_config(refiner_repository, "scheduler", "cpu"))
    assert (params["recipe"], params["recipe_refiner"], params["high_noise_frac"]) == \
        ("sdxl-base-refiner", str(tiny_dir / "refiner"), "0.8")
    assert parameters(read_config(refiner_repository, "tokenizer"))["high_noise_frac"] == "0.8"


def test_defaults_served_match_the_expert_ensemble(refiner_server, reference):
    """No steps, guidance or high_noise_frac sent: 20 Euler steps, CFG 5, the refiner from 0.8 on;
    a negative prompt, 2 images, non-square; HTTP and gRPC."""
    wanted = expected(reference, "a lighthouse", seed=5, steps=20, high_noise_frac=0.8, guidance=5.0, negative="blurry",
                      height=128, width=192, num_images=2)
    for protocol, url in (("http", refiner_server.http_url), ("grpc", refiner_server.grpc_url)):
        result = generate("a lighthouse", url=url, protocol=protocol, seed=5, negative_prompt="blurry", height=128, width=192,
                          num_images_per_prompt=2)
        assert_close(result.images, wanted)


@pytest.mark.parametrize("frac, guidance, negative", [(0.5, 5.0, ""), (0.3, 1.0, ""), (0.9, 7.0, "low quality")])
def test_high_noise_frac_served_matches_the_expert_ensemble(refiner_server, reference, frac, guidance, negative):
    """An empty negative prompt with CFG: the base zeroes it, the refiner encodes it (its model_index.json)."""
    wanted = expected(reference, "a red rose", seed=9, steps=10, high_noise_frac=frac, guidance=guidance, negative=negative)
    result = generate("a red rose", url=refiner_server.grpc_url, protocol="grpc", seed=9, num_inference_steps=10,
                      guidance_scale=guidance, negative_prompt=negative or None, height=128, width=128, high_noise_frac=frac)
    assert_close(result.images, wanted)


def test_high_noise_frac_one_is_the_base_alone(refiner_server, reference):
    from reference import diffusers_images

    wanted = diffusers_images(reference, "a city", seed=3, steps=8, guidance=5.0, height=128, width=128, scheduler="model")
    result = generate("a city", url=refiner_server.http_url, seed=3, num_inference_steps=8, height=128, width=128,
                      high_noise_frac=1.0)
    assert_close(result.images, wanted)


def test_the_stream_hands_off_in_the_engine(refiner_server, reference):
    """sdxl_stream runs the continuous-batching engine: the same hand-off, the same final images."""
    wanted = expected(reference, "a cat", seed=11, steps=6, high_noise_frac=0.5, guidance=5.0, negative="blurry")
    updates = list(generate("a cat", url=refiner_server.grpc_url, protocol="grpc", stream=True, preview_every=0, seed=11,
                            num_inference_steps=6, negative_prompt="blurry", height=128, width=128, high_noise_frac=0.5))
    assert [u.step for u in updates] == [1, 2, 3, 4, 5, 6] and updates[-1].final
    assert_close(updates[-1].images, wanted)


BAD = [(0.0, "a number in (0, 1]"), (1.5, "a number in (0, 1]"), (-0.2, "a number in (0, 1]"), (math.nan, "a number in (0, 1]")]


@pytest.mark.parametrize("value, accepted", BAD)
def test_bad_high_noise_frac_is_named(refiner_server, value, accepted):
    for protocol, url in (("http", refiner_server.http_url), ("grpc", refiner_server.grpc_url)):
        with pytest.raises(ClientError, match=r"high_noise_frac: nan is not accepted" if math.isnan(value)
                           else rf"high_noise_frac: {value} is not accepted") as raised:
            generate("a cat", url=url, protocol=protocol, num_inference_steps=2, height=128, width=128, high_noise_frac=value)
        assert accepted in str(raised.value) and raised.value.status in ("400", "StatusCode.INVALID_ARGUMENT")


def test_high_noise_frac_without_a_refiner_is_refused(triton):
    """The default repository (lcm, no refiner): the input is refused, naming it and saying why."""
    for protocol, url in (("http", triton.http_url), ("grpc", triton.grpc_url)):
        with pytest.raises(ClientError, match=r"high_noise_frac: 0.8 is not accepted; expected no high_noise_frac: no refiner "
                                              r"is served here"):
            generate("a cat", url=url, protocol=protocol, height=128, width=128, high_noise_frac=0.8)
    assert not (triton.repository / REFINER_UNET_NAME).exists()


def test_steps_outside_the_recipe_are_named(refiner_server):
    with pytest.raises(ClientError, match=r"num_inference_steps: 51 is not accepted; expected an integer from 1 to 50 "
                                          r"\(recipe sdxl-base-refiner\)"):
        generate("a cat", url=refiner_server.http_url, num_inference_steps=51, height=128, width=128)


def test_client_info_shows_the_refiner(refiner_server, tiny_dir):
    recipe = info(refiner_server.http_url, admin_key=refiner_server.admin_key)
    assert (recipe["recipe_refiner"], recipe["high_noise_frac"]) == (str(tiny_dir / "refiner"), "0.8")


def test_refiners_that_do_not_fit_are_named(tiny_dir, reference):
    from contract.networks import ModelDims

    dims = ModelDims.from_pipeline(reference)
    with pytest.raises(ExportError, match=r"--refiner '.*': not an SDXL refiner for this model: cross_attention_dim 80 "
                                          r"\(expected 48\), projection_class_embeddings_input_dim 88 \(expected 80\)"):
        load_refiner(str(tiny_dir), dims)  # the base pipeline: its own UNet is no refiner
    with pytest.raises(ExportError, match=r"--refiner '.*missing': no such file or directory"):
        load_refiner(str(tiny_dir / "missing"), dims)
