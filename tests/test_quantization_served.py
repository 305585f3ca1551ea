"""8-bit graphs served unchanged: `python -m export onnx --unet-precision int8 --vae-precision int8` on
the tiny pipeline, and the float repository with an FP8 UNet and that INT8 VAE decoder (the session's
quantized repositories, test_quantization.py's too), each served by a real tritonserver (the CPU variant: ONNX Runtime runs the
Q/DQ graphs), answering like the float repository within the quantization error, with and without a
LoRA-free request's plain UNet, over HTTP and gRPC."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import ENSEMBLE_ONLY, running

from client import generate
from contract import layout
from contract.configs import CPU_DTYPE
from serving.server import TritonServer, free_ports

# Mean pixel difference (0-255) against the float repository's image, tiny random-weight model,
# calibrated on 4 to 8 prompts at 128x128: measured 1.5 to 1.7 levels (benchmarks/results/quantization_cpu.md).
MAX_MEAN_DIFFERENCE = 6.0
REQUEST = {"seed": 11, "height": 128, "width": 128, "num_inference_steps": 4}


def with_graphs_of(float_repository, graphs: dict, repository) -> None:
    """`repository`: a copy of `float_repository` with the version directories of `graphs` (network ->
    the repository to take it from) in place of its own (graph, export.json: the precision is the graph's)."""
    shutil.copytree(float_repository, repository, dirs_exist_ok=True)
    for name, source in graphs.items():
        shutil.rmtree(layout.version_dir(repository, name))
        shutil.copytree(layout.version_dir(source, name), layout.version_dir(repository, name))


@pytest.fixture(scope="module", params=[("fp8", "int8"), ("int8", "int8")], ids=["unet-fp8-vae-int8", "unet-int8-vae-int8"])
def quantized_server(request, exported, quantized, tmp_path_factory):
    """unet-int8-vae-int8: the CLI's whole export (`--unet-precision int8 --vae-precision int8`, the
    session's quantized("int8")), end to end. unet-fp8-vae-int8: the float repository with the session's
    FP8 UNet and that INT8 VAE decoder (an export of its own would repeat the same code for a minute)."""
    unet, vae = request.param
    if unet == "int8":
        repository = quantized("int8")
    else:
        repository = tmp_path_factory.mktemp(f"served_{unet}_{vae}")
        with_graphs_of(exported(CPU_DTYPE), {"unet": quantized("fp8"), "vae_decoder": quantized("int8")}, repository)
    assert layout.graph_precision(layout.version_dir(repository, "unet")) == unet
    assert layout.graph_precision(layout.version_dir(repository, "vae_decoder")) == vae
    log = tmp_path_factory.mktemp("quantized_server") / "tritonserver.log"
    with running(TritonServer(repository, "cpu", *free_ports(3), log_file=log, extra_args=ENSEMBLE_ONLY)) as server:
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
