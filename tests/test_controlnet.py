"""ControlNets: the residual layout, the ControlNet graph's module and the UNet that adds its residuals,
each against diffusers' modules (their graphs against these modules: test_onnx_parity.py); the
check that a ControlNet fits the base model; the export's ControlNet models."""

from __future__ import annotations

import pytest
import torch
from helpers import run_torch

from contract import networks
from contract.networks import ModelDims, control_residual_layout, control_width
from export.modules import ControlNet, UNet, UnionControlNet, split_residuals
from export.onnx_export import example_inputs
from export.sources import ExportError, check_controlnet, load_controlnet

SHAPES = {
    "1x128x128": dict(batch=1, latent_height=16, latent_width=16),
    "3x192x320": dict(batch=3, latent_height=24, latent_width=40),
}


@pytest.fixture(scope="module")
def controlnet(loaded, exported):
    """The tiny ControlNet in fp32, checked against the tiny pipeline (conftest.exported gives it)."""
    exported("fp32")
    return loaded("fp32").pipe.controlnet


def test_sdxl_residuals_are_the_published_shapes():
    """SDXL at 1024² (latents 128²): 3 x [320,128,128], [320,64,64], 2 x [640,64,64], [640,32,32], 2 x [1280,32,32]
    and the mid block's [1280,32,32]."""
    layout = control_residual_layout((320, 640, 1280), 2)
    shapes = [(channels, 128 >> level, 128 >> level) for channels, level in layout]
    assert shapes == [(320, 128, 128)] * 3 + [(320, 64, 64)] + [(640, 64, 64)] * 2 + [(640, 32, 32)] + [(1280, 32, 32)] * 3
    assert control_width(layout) == networks.SDXL_DIMS.control_width
    size = networks.CONTROL_RESIDUALS.shape(networks.SDXL_DIMS, batch=1, latent_height=128, latent_width=128)[1]
    assert size == sum(c * h * w for c, h, w in shapes)


def test_a_unet_with_more_down_blocks_takes_no_controlnet():
    with pytest.raises(ValueError, match="4 down blocks"):
        control_residual_layout((384, 768, 1536, 1536), 2)  # SDXL's refiner
    assert networks.unet_control_width((384, 768, 1536, 1536), 2) == 0


def test_the_graph_module_gives_diffusers_residuals_flattened(controlnet, loaded):
    """ControlNet (the graph's module) against ControlNetModel called as the SDXL ControlNet pipeline calls it:
    the control image as its control_image_processor makes it (x / 255, not normalized), scale 1."""
    model, pipe = controlnet, loaded("fp32").pipe
    dims = ModelDims.from_pipeline(pipe)
    inputs = example_inputs(networks.CONTROLNET, dims, "FP32", seed=3, **SHAPES["3x192x320"])
    flat = run_torch(ControlNet(model), inputs)[0]
    added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    image = inputs["controlnet_cond"].permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        down, mid = model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], controlnet_cond=image,
                          added_cond_kwargs=added, return_dict=False)
    layout = control_residual_layout(model.config.block_out_channels, model.config.layers_per_block)
    parts = split_residuals(torch.from_numpy(flat), layout, 24, 40)
    assert [tuple(p.shape) for p in parts] == [tuple(r.shape) for r in (*down, mid)]
    for part, residual in zip(parts, (*down, mid)):
        assert torch.equal(part, residual)
    assert flat.shape == networks.CONTROL_RESIDUALS.shape(dims, batch=3, latent_height=24, latent_width=40)


def test_the_unet_adds_residuals_as_diffusers_does(controlnet, loaded):
    """UNet with control_residuals against UNet2DConditionModel given the ControlNet's down and mid
    residuals, with and without LoRA inputs; zero residuals change nothing."""
    model, pipe = controlnet, loaded("fp32").pipe
    dims = ModelDims.from_pipeline(pipe)
    inputs = example_inputs(networks.UNET_CONTROL, dims, "FP32", seed=4, **SHAPES["3x192x320"])
    unet = UNet(pipe.unet).eval()
    layout = control_residual_layout(model.config.block_out_channels, model.config.layers_per_block)
    *down, mid = split_residuals(inputs["control_residuals"], layout, 24, 40)
    plain = {name: inputs[name] for name in networks.UNET.input_names}
    added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    with torch.no_grad():
        ours = unet(*plain.values(), control_residuals=inputs["control_residuals"])
        theirs = pipe.unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=added,
                           down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid, return_dict=False)[0]
        assert torch.equal(ours, theirs)
        zeros = torch.zeros_like(inputs["control_residuals"])
        no_lora = {"lora_down": torch.zeros_like(inputs["lora_down"]), "lora_up": torch.zeros_like(inputs["lora_up"])}
        assert torch.allclose(unet(*plain.values(), **no_lora, control_residuals=zeros), unet(*plain.values()), atol=1e-5)
        with_lora = unet(*inputs.values())
        assert not torch.allclose(with_lora, unet(*plain.values(), lora_down=inputs["lora_down"], lora_up=inputs["lora_up"]))


def _diffusers_union(model, inputs, rows, modes, scales):
    """ControlNetUnionModel as StableDiffusionXLControlNetUnionPipeline calls it for `rows` of `inputs`:
    one image per mode (slot k of each row), control_type the modes' multi-hot, the modes' scales."""
    control_type = torch.zeros(rows.stop - rows.start, model.config.num_control_type)
    control_type[:, modes] = 1
    images = [inputs["controlnet_cond"][rows, k].permute(0, 3, 1, 2).float() / 255.0 for k in range(len(modes))]
    with torch.no_grad():
        down, mid = model(inputs["sample"][rows], inputs["timestep"][rows], inputs["encoder_hidden_states"][rows],
                          controlnet_cond=images, control_type=control_type, control_type_idx=modes, conditioning_scale=scales,
                          added_cond_kwargs={"text_embeds": inputs["text_embeds"][rows], "time_ids": inputs["time_ids"][rows]},
                          return_dict=False)
    return torch.cat([r.flatten(1) for r in (*down, mid)], dim=1)


def test_the_union_module_serves_several_requests_as_diffusers_serves_each(loaded, exported):
    """UnionControlNet (the graph's module) on one call holding two requests' rows (each 2 rows: CFG halves):
    one with a lone mode (depth; its scale applied after, as the loop does), one with two (depth and canny at
    0.7 and 1.3, inside the network), against ControlNetUnionModel called for each request alone. Its
    transformer attends across a call's rows (nn.MultiheadAttention over dim 0): control_groups keeps
    requests apart; one group for all four rows changes them."""
    exported("fp32")
    pipe = loaded("fp32").pipe
    model, dims = pipe.union_controlnet, ModelDims.from_pipeline(pipe)
    inputs = example_inputs(networks.UNION_CONTROLNET, dims, "FP32", seed=5, batch=4, latent_height=16, latent_width=24,
                            control_modes=2)
    inputs["timestep"][:] = inputs["timestep"][0]
    inputs.update(control_modes=torch.tensor([[1, -1], [1, -1], [1, 3], [1, 3]]), control_groups=torch.tensor([0, 0, 1, 1]),
                  control_mode_scales=torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.7, 1.3], [0.7, 1.3]]))
    ours = torch.from_numpy(run_torch(UnionControlNet(model), inputs)[0])
    lone = _diffusers_union(model, inputs, slice(0, 2), [1], [0.8])
    assert torch.allclose(ours[:2] * 0.8, lone, rtol=1e-4, atol=1e-5)
    both = _diffusers_union(model, inputs, slice(2, 4), [1, 3], [0.7, 1.3])
    assert torch.allclose(ours[2:], both, rtol=1e-4, atol=1e-5)
    mixed = torch.from_numpy(run_torch(UnionControlNet(model), {**inputs, "control_groups": torch.zeros(4, dtype=torch.int64)})[0])
    assert not torch.allclose(mixed, ours, rtol=1e-3, atol=1e-4)


def test_a_controlnet_for_another_model_is_refused_by_name(tiny_dir, loaded):
    dims = ModelDims.from_pipeline(loaded("fp32").pipe)
    config = load_controlnet(str(tiny_dir / "controlnet")).config
    with pytest.raises(ExportError, match=rf"--controlnet 'x': not an SDXL ControlNet for this model: cross_attention_dim 96 \(expected {dims.text_dim}\)"):
        check_controlnet(type("Config", (), {**dict(config), "cross_attention_dim": 96})(), dims, "--controlnet 'x'")
    with pytest.raises(ExportError, match=r"residuals \(control_width\) \d+ \(expected 1600\)"):
        check_controlnet(type("Config", (), {**dict(config), "layers_per_block": 2})(), dims, "--controlnet 'x'")


@pytest.mark.parametrize("flags, message", [
    (["--controlnet", "Canny=x"], "--controlnet 'Canny=x': name 'Canny' is not a ControlNet name (1 to 32 of a-z 0-9 _ -"),
    (["--controlnet", "canny"], "--controlnet 'canny': expected NAME=PATH"),
    (["--controlnet", "a=x", "--controlnet", "a=y"], "--controlnet: a given more than once"),
    (["--controlnet", "a=x", "--controlnet-preprocessor", "a=pose"], "--controlnet-preprocessor 'a=pose': expected NAME=KIND, KIND one of canny, depth"),
    (["--controlnet", "a=x", "--controlnet-preprocessor", "a=depth"], "--controlnet-preprocessor a=depth: depth maps need a depth estimator; add --depth-estimator"),
    (["--controlnet", "a=x", "--controlnet-preprocessor", "b=canny"], "--controlnet-preprocessor: b is not a --controlnet of this export (a)"),
])
def test_bad_controlnet_flags_are_refused_before_any_work(flags, message, tmp_path, capsys):
    """Exit status 2 with the message (argparse's for a flag's own form, the export's for flags that
    disagree), before any model is read or file written."""
    from export.cli import main

    try:
        code = main(["onnx", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "repo"), *flags])
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "repo" / "unet").exists()


@pytest.mark.parametrize("height, width", [(128, 192), (512, 1536), (1024, 768), (300, 300)])
def test_the_loops_depth_processing_is_transformers_processor(exported, loaded, height, width):
    """serving/depth.py computes the depth estimator's input without transformers (the loops skip its
    import): equal to the exported processor's own output (DPTImageProcessor's PIL backend), sizes
    with the aspect kept at multiples of 14."""
    import numpy as np
    from PIL import Image

    from serving.depth import DepthPreprocessor

    repository, processor = exported("fp32"), loaded("fp32").pipe.depth_processor
    image = np.random.default_rng(height + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = DepthPreprocessor(repository).pixel_values(image)
    theirs = processor(images=Image.fromarray(image), return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape and ours.shape[2] % 14 == 0 and ours.shape[3] % 14 == 0
    assert torch.equal(ours, theirs)
