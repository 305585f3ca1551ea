"""Fused LoRAs in the exported UNet equal diffusers' own (unfused) LoRA application."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close, ort_session, run_onnx, run_torch

from contract import layout, networks
from export.modules import UNet
from contract.networks import ModelDims
from export.onnx_export import example_inputs, export_pipeline
from export.sources import LoraSpec, Sources, load_pipeline
from export.tiny import write_random_lora

SHAPE = dict(batch=2, latent_height=16, latent_width=24)


def unet_inputs(pipe):
    """Without per-request LoRAs: the fused ones are in the graph's weights."""
    return example_inputs(networks.UNET, ModelDims.from_pipeline(pipe), "FP32", seed=3, **SHAPE)


def reference_unet(tiny_dir, loras: list[tuple[str, float]]):
    """diffusers' way: LoRAs loaded as PEFT layers, weighted by set_adapters, not fused."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    names = []
    for index, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"ref_{index}")
        names.append(f"ref_{index}")
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
    return pipe


def exported_unet(tiny_dir, repository, loras: list[tuple[str, float]]):
    sources = Sources(str(tiny_dir), tuple(LoraSpec(path, weight) for path, weight in loras))
    loaded = load_pipeline(sources, "fp32")
    export_pipeline(loaded, repository, "fp32", names=("unet",))
    return loaded.pipe, ort_session(repository, "unet")


@pytest.fixture(scope="module")
def second_lora(tiny_dir, tmp_path_factory):
    """A style LoRA stand-in: another random LoRA on the same UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    out = tmp_path_factory.mktemp("style_lora")
    write_random_lora(unet, out, seed=11, rank=2, alpha=2.0)
    return str(out)


def fused_against_unfused(tiny_dir, tmp_path, loras: list[tuple[str, float]], what: str):
    """The exported (fused) UNet graph against diffusers' unfused LoRAs, on the same inputs."""
    reference = reference_unet(tiny_dir, loras)
    inputs = unet_inputs(reference)
    (expected,) = run_torch(UNet(reference.unet).eval(), inputs)
    _, session = exported_unet(tiny_dir, tmp_path, loras)
    (actual,) = run_onnx(session, inputs)
    assert_close(actual, expected, "fp32", what)
    return reference, inputs, expected, actual


def test_fused_lora_matches_diffusers_unfused(tiny_dir, tmp_path):
    reference, inputs, expected, _ = fused_against_unfused(tiny_dir, tmp_path, [(str(tiny_dir / "lora"), 1.0)], "unet with LoRA")

    reference.disable_lora()
    (without_lora,) = run_torch(UNet(reference.unet).eval(), inputs)
    change = np.abs(without_lora - expected).max() / np.abs(expected).max()
    assert change > 0.05, f"the LoRA changes the UNet's output by only {change:.2%}: the test would not see a missing LoRA"


def test_two_weighted_loras_match_set_adapters(tiny_dir, second_lora, tmp_path):
    loras = [(str(tiny_dir / "lora"), 1.0), (second_lora, 0.6)]
    reference, inputs, expected, actual = fused_against_unfused(tiny_dir, tmp_path, loras, "unet with two weighted LoRAs")

    reference.set_adapters(["ref_0", "ref_1"], adapter_weights=[1.0, 1.0])
    (unweighted,) = run_torch(UNet(reference.unet).eval(), inputs)
    assert np.abs(unweighted - actual).max() > 10 * np.abs(expected - actual).max(), "the 0.6 weight made no difference"


def test_no_lora_layers_left(tiny_dir, exported, loaded):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = loaded("fp32").pipe
    assert loaded("fp32").adapters == {"unet": ["lora_0"]}
    for component in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        assert not [n for n, m in component.named_modules() if isinstance(m, BaseTunerLayer)]
    model = onnx.load(str(layout.onnx_path(exported("fp32"), "unet")))
    names = [i.name for i in model.graph.initializer] + [n.name for n in model.graph.node]
    assert not [n for n in names if "lora" in n.lower()]


def test_tiny_lora_covers_every_targeted_layer(tiny_dir):
    """Every LoRA weight pair in the file becomes a layer: a format slip would silently drop some."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(tiny_dir / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        pairs = len(list(f.keys())) // 2
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    pipe.load_lora_weights(tiny_dir / "lora", adapter_name="x")
    layers = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "x" in m.lora_A)
    assert layers == pairs > 100
