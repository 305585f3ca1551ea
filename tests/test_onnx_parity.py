"""Each exported graph, run by ONNX Runtime on the CPU, matches its PyTorch module (helpers.py: tolerances)."""

from __future__ import annotations

import onnx
import pytest
from helpers import assert_close, assert_pixels_close, graph_model, ort_session, run_onnx, run_torch

from contract import layout, networks
from export.modules import build_module
from contract.networks import ModelDims
from export.onnx_export import COMPUTE_DTYPES, check_graph_io, example_inputs

# Two shapes per graph: batch and (latent) resolution both change, one of them non-square.
SHAPES = {
    "1x128x128": dict(batch=1, latent_height=16, latent_width=16),
    "3x192x320": dict(batch=3, latent_height=24, latent_width=40),
}


# unet_lora, unet_control and unet_ip in fp16 at one shape: ONNX Runtime's CPU fp16 kernels make its batch-3 case cost 25 s,
# and the fp32 cases already cover batches that mix LoRA ranks and rows without LoRAs.
CASES = [(dtype, network, shape) for dtype in ("fp32", "fp16") for network in networks.NETWORKS for shape in SHAPES
         if not (network in (networks.UNET_LORA.name, networks.UNET_CONTROL.name, networks.UNET_IP_NAME) and dtype == "fp16"
                 and shape != "1x128x128")]


@pytest.mark.parametrize("dtype, network, shape", CASES)
def test_graph_matches_module(graphs, dtype, network, shape):
    pipe, repository = graphs(dtype, network)
    spec = networks.NETWORKS[network]
    inputs = example_inputs(spec, ModelDims.from_pipeline(pipe), COMPUTE_DTYPES[dtype], seed=1, **SHAPES[shape])
    expected = run_torch(build_module(network, pipe), inputs)
    actual = run_onnx(ort_session(repository, network), inputs)
    for tensor, got, want in zip(spec.outputs, actual, expected):
        what = f"{network}.{tensor.name} {dtype} {shape}"
        if tensor.dtype == "UINT8":
            assert_pixels_close(got, want, dtype, what)
        else:
            assert_close(got, want, dtype, what)


@pytest.mark.parametrize("network", networks.NETWORKS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_graph_interface_is_the_spec(graphs, dtype, network):
    """Names, order, element types and dims (dynamic ones named as in the spec)."""
    pipe, repository = graphs(dtype, network)
    model = onnx.load(str(layout.onnx_path(repository, graph_model(network))), load_external_data=False)
    spec = networks.NETWORKS[network]
    check_graph_io(model, spec, ModelDims.from_pipeline(pipe), COMPUTE_DTYPES[dtype])
    for value, tensor in zip(list(model.graph.input) + list(model.graph.output), spec.inputs + spec.outputs):
        named = [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
        assert named == [d for d in tensor.dims if d in networks.DYNAMIC_DIMS], value.name


def test_vae_decoder_outputs_displayable_pixels(loaded, exported):
    """uint8 NHWC RGB, image size 8x the latent size, the whole 0..255 range reachable."""
    spec = networks.VAE_DECODER
    inputs = example_inputs(spec, ModelDims.from_pipeline(loaded("fp16").pipe), "FP16", batch=2, latent_height=16, latent_width=24)
    (images,) = run_onnx(ort_session(exported("fp16"), "vae_decoder"), inputs)
    assert images.shape == (2, 128, 192, 3)
    assert images.dtype.name == "uint8"
    assert images.std() > 1, "a constant image means the decoder or the conversion is broken"


def test_serving_files_written(exported):
    from diffusers import LCMScheduler
    from transformers import CLIPTokenizer

    repository = exported("fp16")
    scheduler = LCMScheduler.from_pretrained(layout.scheduler_config_path(repository).parent)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    for which in layout.TOKENIZER_DIRS:
        tokenizer = CLIPTokenizer.from_pretrained(layout.tokenizer_dir(repository, which))
        assert tokenizer.model_max_length == 77
