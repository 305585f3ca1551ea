"""`python -m export tiny`: a tiny SDXL in diffusers layout, same classes as SDXL, seeded weights."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from export.cli import main
from contract.networks import ModelDims


def test_tiny_layout_and_classes(tiny_dir):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_dir / component).is_dir(), component
    assert (tiny_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tiny_dir / "alt_vae" / "config.json").is_file()

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    assert type(pipe.text_encoder) is CLIPTextModel
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    assert type(pipe.unet) is UNet2DConditionModel and pipe.unet.config.addition_embed_type == "text_time"
    assert "CrossAttnDownBlock2D" in pipe.unet.config.down_block_types
    assert type(pipe.vae) is AutoencoderKL and pipe.vae.config.force_upcast is False
    assert pipe.config.force_zeros_for_empty_prompt is True
    dims = ModelDims.from_pipeline(pipe)
    assert (dims.seq_len, dims.text_dim, dims.pooled_dim, dims.latent_channels, dims.vae_scale_factor) == (77, 80, 40, 4, 8)
    assert pipe.unet.config.cross_attention_dim == dims.text_dim


def test_tiny_seed_changes_weights_and_is_deterministic(tmp_path, tiny_dir):
    """Seed 7 twice: the same weights; the session's tiny model (seed 0): others."""
    for name in ("a", "b"):
        assert main(["tiny", str(tmp_path / name), "--seed", "7"]) == 0
    (tmp_path / "c").symlink_to(tiny_dir)

    def weights(name, component="unet"):
        return load_file(tmp_path / name / component / "diffusion_pytorch_model.safetensors")

    a, b, c = weights("a"), weights("b"), weights("c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    vae_a, vae_c = weights("a", "vae"), weights("c", "vae")
    assert not all(torch.equal(vae_a[k], vae_c[k]) for k in vae_a)
    # The stand-in fp16-fix VAE differs from the pipeline's own.
    own, alt = weights("a", "vae"), load_file(tmp_path / "a" / "alt_vae" / "diffusion_pytorch_model.safetensors")
    assert own.keys() == alt.keys() and not all(torch.equal(own[k], alt[k]) for k in own)
