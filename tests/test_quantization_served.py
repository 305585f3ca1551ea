"""8-bit graphs served unchanged: `python -m export onnx --unet-precision fp8 --vae-precision int8` and
`--unet-precision int8` on the tiny pipeline, each served by a real tritonserver (the CPU variant:
ONNX Runtime runs the Q/DQ graphs), answering like the float repository within the quantization
error, with and without a LoRA-free request's plain UNet, over HTTP and gRPC."""

from __future__ import annotations

import numpy as np
import pytest

from client import generate
from contract import layout
from contract.configs import CPU_DTYPE
from export.cli import main as export_main
from serving.server import TritonServer, free_port

# Mean pixel difference (0-255) against the float repository's image, tiny random-weight model,
# calibrated on 8 prompts at 128x128: measured 1.5 to 1.7 levels (benchmarks/results/quantization_cpu.md).
MAX_MEAN_DIFFERENCE = 6.0
REQUEST = {"seed": 11, "height": 128, "width": 128, "num_inference_steps": 4}


def export(tiny_dir, repository, *precision_flags: str) -> None:
    assert export_main([
        "onnx", "--model", str(tiny_dir), "--lora", str(tiny_dir / "lora"), "--vae", str(tiny_dir / "alt_vae"),
        "--preview-vae", str(tiny_dir / "preview_vae"), "--safety-checker", str(tiny_dir / "safety_checker"),
        "--dtype", CPU_DTYPE, "--out", str(repository), *precision_flags,
        "--calibration-count", "8", "--calibration-size", "128",
    ]) == 0


@pytest.fixture(scope="module", params=[("fp8", "int8"), ("int8", CPU_DTYPE)], ids=["unet-fp8-vae-int8", "unet-int8"])
def quantized_server(request, tiny_dir, tmp_path_factory):
    unet, vae = request.param
    repository = tmp_path_factory.mktemp(f"served_{unet}_{vae}")
    export(tiny_dir, repository, "--unet-precision", unet, "--vae-precision", vae)
    assert layout.graph_precision(layout.version_dir(repository, "unet")) == unet
    assert layout.graph_precision(layout.version_dir(repository, "vae_decoder")) == vae
    log = tmp_path_factory.mktemp("quantized_server") / "tritonserver.log"
    with TritonServer(repository, "cpu", free_port(), free_port(), free_port(), log_file=log).start() as server:
        yield server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_images_are_close_to_the_float_repositorys(quantized_server, triton, protocol):
    url = quantized_server.http_url if protocol == "http" else quantized_server.grpc_url
    float_url = triton.http_url if protocol == "http" else triton.grpc_url
    served = generate("a red bicycle", url=url, protocol=protocol, **REQUEST).images
    wanted = generate("a red bicycle", url=float_url, protocol=protocol, **REQUEST).images
    assert served.shape == wanted.shape == (1, 128, 128, 3)
    difference = np.abs(served.astype(int) - wanted.astype(int))
    assert 0 < difference.mean() <= MAX_MEAN_DIFFERENCE, difference.mean()


def test_served_batches_and_cfg(quantized_server, triton):
    """Two images with CFG and a negative prompt: the UNet's batch of 4 rows through the Q/DQ graph."""
    kwargs = dict(REQUEST, num_images_per_prompt=2, guidance_scale=3.0, negative_prompt="blurry", height=128, width=192)
    served = generate("a lighthouse", url=quantized_server.http_url, **kwargs).images
    wanted = generate("a lighthouse", url=triton.http_url, **kwargs).images
    assert served.shape == wanted.shape == (2, 128, 192, 3)
    assert np.abs(served.astype(int) - wanted.astype(int)).mean() <= MAX_MEAN_DIFFERENCE
