"""IP-Adapters in process (no server): the graphs' modules against diffusers' load_ip_adapter for the plain
adapter and Plus, with a scale per row; InstantStyle's layer settings against diffusers' set_ip_adapter_scale on
SDXL's architecture; the image processor against transformers'; the request checks; the loop's rows; what the
export refuses."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from contract.ip_adapters import LAYER_SETTINGS, ip_layer_names, layer_masks
from contract.limits import Limits
from export.ip_adapter import (IMAGE_ENCODER_SUBFOLDER, IP_ADAPTER_SUBFOLDER, PLAIN_FILE, PLUS_FILE, load_image_encoder,
                               load_ip_adapter, tiny_image_encoder)
from export.modules import ImageEncoder, UNet
from export.sources import ExportError
from serving.endpoint import InvalidInput
from serving.ip_adapters import ImagePrompt, ImagePromptSpec, check_image_prompt

# InstantStyle's settings as diffusers' IP-Adapter guide writes them for SDXL.
INSTANTSTYLE = {"style": {"up": {"block_0": [0.0, 1.0, 0.0]}}, "layout": {"down": {"block_2": [0.0, 1.0]}},
                "style_and_layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}}


def diffusers_layer_scales(unet, scale) -> list[float]:
    """The scale set_ip_adapter_scale(scale) gives each IP layer, as its loop assigns them (diffusers'
    _maybe_expand_lora_scales, then the first key each layer's name starts with), in the UNet's order."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    (expanded,) = _maybe_expand_lora_scales(unet, [scale], default_scale=0.0)
    scales = []
    for name in ip_layer_names(unet.attn_processors):
        found = [value for key, value in expanded.items() if name.startswith(key)] if isinstance(expanded, dict) else [expanded]
        scales.append(float(found[0][0] if isinstance(found[0], list) else found[0]))
    return scales


def test_instantstyles_settings_are_diffusers_on_sdxls_unet():
    """On SDXL's architecture (meta device): 70 IP layers, and each setting's mask is the scale diffusers'
    set_ip_adapter_scale gives each layer with the guide's dict (1 on the kept layers, 0 elsewhere)."""
    from diffusers import UNet2DConditionModel

    from contract.networks import SDXL_DIMS
    from export.sdxl import UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNET_CONFIG)
    names = ip_layer_names(unet.attn_processors)
    assert len(names) == SDXL_DIMS.ip_layers == 70
    masks = layer_masks(names)
    assert set(masks) == set(LAYER_SETTINGS)
    assert masks["all"] == [1.0] * 70
    for setting, scale in INSTANTSTYLE.items():
        assert masks[setting] == diffusers_layer_scales(unet, scale), setting
    assert sum(masks["style"]) == 10 and sum(masks["layout"]) == 10  # the kept attentions' 10 transformer blocks each


def test_a_unet_without_a_settings_layers_does_not_serve_it(loaded):
    """The tiny UNet has one attention in its last down block: no `layout`, the others as in diffusers."""
    unet = loaded("fp32").pipe.unet
    masks = layer_masks(ip_layer_names(unet.attn_processors))
    assert list(masks) == ["all", "style", "style_and_layout"]
    assert masks["style"] == diffusers_layer_scales(unet, {"up": {"block_0": [0.0, 1.0]}})


@pytest.fixture(scope="module")
def unet(loaded):
    return loaded("fp32").pipe.unet


@pytest.mark.parametrize("file", [PLAIN_FILE, PLUS_FILE])
def test_the_modules_equal_diffusers_with_a_scale_per_row(unet, tiny_dir, file):
    """ImageEncoder: diffusers' encode_image then the UNet's encoder_hid_proj (negative: zeros projected for the
    plain adapter, a zero image's encoding projected for Plus). UNet with ip inputs, rows at scales 0.6 and 1.3:
    each row equals diffusers' UNet after load_ip_adapter + set_ip_adapter_scale at that scale; a row of zero
    tokens equals the UNet without an adapter."""
    from diffusers import StableDiffusionXLPipeline

    path = tiny_dir / IP_ADAPTER_SUBFOLDER / file
    adapter = load_ip_adapter(str(path), unet)
    encoder = load_image_encoder(str(tiny_dir / IMAGE_ENCODER_SUBFOLDER), adapter)
    plus = file == PLUS_FILE
    reference = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                          unet=copy.deepcopy(unet), scheduler=None, image_encoder=encoder, feature_extractor=None)
    reference.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, negative = ImageEncoder(encoder, adapter)(pixels)
        embeds, uncond = reference.encode_image(pixels, "cpu", 1, output_hidden_states=plus)
        projected = reference.unet.encoder_hid_proj([embeds[:, None]])[0][:, 0]
        assert torch.equal(tokens, projected)
        assert torch.equal(negative, reference.unet.encoder_hid_proj([uncond[:, None]])[0][:, 0])
        generator = torch.Generator().manual_seed(1)
        sample, text = torch.randn(3, 4, 16, 16, generator=generator), torch.randn(3, 77, 80, generator=generator)
        pooled, time_ids, timestep = torch.randn(3, 40, generator=generator), torch.full((3, 6), 128.0), torch.full((3,), 500.0)
        scales = torch.tensor([0.6, 1.3, 0.7])[:, None].expand(3, len(adapter.names))
        rows = torch.cat([tokens, torch.zeros_like(tokens[:1])])
        ours = UNet(unet, ip_adapter=adapter)(sample, timestep, text, pooled, time_ids, ip_tokens=rows, ip_layer_scales=scales)
        for row, scale in ((0, 0.6), (1, 1.3)):
            reference.set_ip_adapter_scale(scale)
            expected = reference.unet(sample[row:row + 1], timestep[row:row + 1], text[row:row + 1], return_dict=False,
                                      added_cond_kwargs={"text_embeds": pooled[row:row + 1], "time_ids": time_ids[row:row + 1],
                                                         "image_embeds": [embeds[row:row + 1, None]]})[0]
            torch.testing.assert_close(ours[row:row + 1], expected, rtol=1e-5, atol=1e-5)
        plain = UNet(unet)(sample, timestep, text, pooled, time_ids)
        assert torch.equal(ours[2:], plain[2:])  # zero tokens add exactly nothing


def test_the_image_processor_equals_diffusers_loaders():
    """The loop's CLIP preprocessing (serving/safety.py ClipPreprocessor on the export's config) equals
    transformers' CLIPImageProcessor(size=224, crop_size=224), what load_ip_adapter registers, at odd sizes."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from export.ip_adapter import image_processor_config
    from serving.safety import ClipPreprocessor

    ours = ClipPreprocessor(image_processor_config(224), "test")
    theirs = CLIPImageProcessor(size=224, crop_size=224)
    rng = np.random.default_rng(3)
    for height, width in ((300, 200), (224, 224), (97, 640), (1, 5)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        np.testing.assert_array_equal(ours(image), theirs(Image.fromarray(image), return_tensors="np").pixel_values[0])


class Served:
    layer_settings = {"all": [1.0, 1.0], "style": [0.0, 1.0]}


IMAGE = np.zeros((40, 30, 3), np.uint8)


@pytest.mark.parametrize("raw, name, message", [
    (dict(ip_adapter_image=np.zeros((0, 30, 3), np.uint8)), "ip_adapter_image", "UINT8 \\[H, W, 3\\]"),
    (dict(ip_adapter_image=np.zeros((40, 30), np.uint8)), "ip_adapter_image", "RGB"),
    (dict(ip_adapter_image=np.zeros((40, 30, 3), np.int32)), "ip_adapter_image", "UINT8"),
    (dict(ip_adapter_image=np.zeros((1537, 30, 3), np.uint8)), "ip_adapter_image", "1 to 1536"),
    (dict(ip_adapter_image=IMAGE, ip_adapter_scale=np.array([np.inf], np.float32)), "ip_adapter_scale", "0 to 2"),
    (dict(ip_adapter_image=IMAGE, ip_adapter_scale=np.array([0.5, 0.5], np.float32)), "ip_adapter_scale", "exactly one"),
    (dict(ip_adapter_image=IMAGE, ip_adapter_layers=np.array([b"layout"], object)), "ip_adapter_layers", "all, style \\(layout"),
    (dict(ip_adapter_layers=np.array([b"style"], object)), "ip_adapter_layers", "without an ip_adapter_image"),
])
def test_bad_image_prompts_are_refused_by_name(raw, name, message):
    with pytest.raises(InvalidInput, match=f"^{name}: .*{message}"):
        check_image_prompt(raw, Limits(), Served())


def test_an_image_prompt_where_none_is_served_is_refused():
    with pytest.raises(InvalidInput, match="^ip_adapter_image: .*serves no IP-Adapter"):
        check_image_prompt(dict(ip_adapter_image=IMAGE), Limits(), None)
    assert check_image_prompt({}, Limits(), None) is None


def test_a_checked_image_prompt():
    spec = check_image_prompt(dict(ip_adapter_image=IMAGE, ip_adapter_scale=np.array([0.6], np.float32),
                                   ip_adapter_layers=np.array([b"style"], object)), Limits(), Served())
    assert spec == ImagePromptSpec(0.6, "style")
    assert check_image_prompt(dict(ip_adapter_image=IMAGE), Limits(), Served()) == ImagePromptSpec(1.0, "all")


def test_the_loops_rows_put_the_negative_tokens_first_and_pad_other_requests():
    """With CFG, the negative tokens on the negative rows (diffusers' order); a batch of a request with an
    image prompt and one without carries zeros for the latter's rows."""
    from serving.denoise import concat_unet_inputs

    tokens, negative = torch.ones(1, 4, 8), -torch.ones(1, 4, 8)
    prompt = ImagePrompt(tokens, negative, torch.tensor([0.0, 0.5]), (3, 5, 2))
    rows = prompt.rows(2, guided=True)
    assert torch.equal(rows["ip_tokens"][:2], negative.expand(2, -1, -1)) and torch.equal(rows["ip_tokens"][2:], tokens.expand(2, -1, -1))
    assert torch.equal(rows["ip_layer_scales"], torch.tensor([[0.0, 0.5]] * 4))
    assert torch.equal(prompt.rows(2, guided=False)["ip_tokens"], tokens.expand(2, -1, -1))
    base = {"sample": torch.zeros(1, 4, 8, 8)}
    with_ip = {**base, **prompt.rows(1, guided=False), "control_residuals": torch.zeros(1, 6),
               "lora_down": torch.zeros(1, 1, 3), "lora_up": torch.zeros(1, 5, 1)}
    batch = concat_unet_inputs([with_ip, dict(base)])
    assert batch["ip_tokens"].shape == (2, 4, 8) and not batch["ip_tokens"][1].any() and not batch["ip_layer_scales"][1].any()
    assert batch["control_residuals"].shape == (2, 6) and batch["lora_down"].shape == (2, 1, 3)


def test_the_export_refuses_adapters_that_do_not_fit(tmp_path, tiny_dir, loaded, capsys):
    """An adapter for another UNet (the refiner's layout: other cross-attentions) and an encoder whose width does
    not feed the projection: refused naming both sides; --ip-adapter without --image-encoder at the CLI."""
    from export.cli import main as export_main
    from export.tiny import tiny_refiner_unet

    plain = str(tiny_dir / IP_ADAPTER_SUBFOLDER / PLAIN_FILE)
    with pytest.raises(ExportError, match="does not fit the UNet .*size mismatch"):
        load_ip_adapter(plain, tiny_refiner_unet(48, 40))
    adapter = load_ip_adapter(plain, loaded("fp32").pipe.unet)
    from transformers import CLIPVisionModelWithProjection

    config = copy.deepcopy(tiny_image_encoder(0).config)
    config.projection_dim = 16
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ExportError, match="projection_dim .* is 16, the plain IP-Adapter's projection takes 24"):
        load_image_encoder(str(tmp_path / "encoder"), adapter)
    from safetensors.torch import save_file

    save_file({"unet.conv_in.weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ExportError, match="not an IP-Adapter file"):
        load_ip_adapter(str(tmp_path / "lora.safetensors"), loaded("fp32").pipe.unet)
    assert export_main(["onnx", "--model", str(tiny_dir), "--ip-adapter", plain, "--out", str(tmp_path / "repo")]) == 2
    assert "--ip-adapter needs --image-encoder" in capsys.readouterr().err


def test_the_encoders_architectures_are_h94s():
    """export/ip_adapter.py's CLIP vision configs: ViT-H/14 (h94's models/image_encoder, 632 M parameters, the vit-h
    adapters') and OpenCLIP bigG/14's vision tower (sdxl_models/image_encoder, 1.84 B, ip-adapter_sdxl's), counted on
    the meta device; the full-size skeleton's image encoder is ViT-H/14 with the plain adapter's projection."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from export.ip_adapter import VIT_BIGG_14, VIT_H_14
    from test_full_size_graphs import initializer_count

    counts = {}
    for name, config in (("vit-h", VIT_H_14), ("bigg", VIT_BIGG_14)):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).parameters())
    assert counts == {"vit-h": 632_076_800, "bigg": 1_844_907_264}
    projection = 1024 * 4 * 2048 + 4 * 2048 + 2 * 2048  # ImageProjection: image_embeds Linear and LayerNorm
    assert abs(initializer_count("image_encoder") - (counts["vit-h"] + projection)) / counts["vit-h"] < 0.01
