"""`python -m export random --arch sdxl`: SDXL base 1.0's exact architecture, checked on the meta device
(shapes only, no memory), against the published parameter counts and the production configs' dims."""

from __future__ import annotations

import pytest
import torch

from contract.configs import expected_dims, read_config
from contract.layout import TEMPLATES as REPO
from contract.networks import NETWORKS, SDXL_DIMS, ModelDims
from export import sdxl
from export.cli import main


def test_parameter_counts_are_sdxl_base():
    assert sdxl.parameter_counts() == sdxl.PARAMETERS
    assert sdxl.PARAMETERS == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                               "text_encoder_2": 694_659_840}


def test_widths_are_the_production_configs():
    modules = {name: sdxl.build_component(name, device="meta") for name in ("text_encoder", "text_encoder_2", "unet", "vae")}
    dims = ModelDims.from_configs(77, *(modules[n].config for n in ("text_encoder", "text_encoder_2", "unet", "vae")))
    assert dims == SDXL_DIMS
    assert modules["unet"].config.cross_attention_dim == dims.text_dim == 2048
    assert modules["unet"].config.projection_class_embeddings_input_dim == 6 * 256 + dims.pooled_dim
    # What the production configs declare is what these graphs will have.
    for network, spec in NETWORKS.items():
        config = read_config(REPO, network)
        for entry, tensor in zip(list(config.input) + list(config.output), spec.inputs + spec.outputs):
            assert list(entry.dims) == expected_dims(tensor, batched=True, model=dims)[0], f"{network}.{tensor.name}"


def test_refiner_takes_the_bases_text_encoder_2_and_five_time_ids():
    """SDXL's refiner (export/sdxl.py REFINER_UNET_CONFIG) fits the refiner_unet spec at SDXL's widths."""
    from contract.networks import REFINER_TIME_IDS_DIM
    from export.sources import check_refiner

    refiner = sdxl.build_component("refiner_unet", device="meta")
    assert refiner.config.cross_attention_dim == SDXL_DIMS.refiner_text_dim == sdxl.TEXT_ENCODER_2_CONFIG["hidden_size"]
    assert refiner.config.projection_class_embeddings_input_dim == REFINER_TIME_IDS_DIM * 256 + SDXL_DIMS.pooled_dim
    check_refiner(refiner.config, SDXL_DIMS, "refiner")  # no error
    assert sum(p.numel() for p in refiner.parameters()) == sdxl.REFINER_UNET_PARAMETERS


def test_fp16_fix_vae_differs_only_in_upcasting():
    assert sdxl.VAE_CONFIG["force_upcast"] is True and sdxl.FP16_FIX_VAE_CONFIG["force_upcast"] is False
    assert {k: v for k, v in sdxl.VAE_CONFIG.items() if k not in ("force_upcast", "sample_size")} == \
        {k: v for k, v in sdxl.FP16_FIX_VAE_CONFIG.items() if k not in ("force_upcast", "sample_size")}


def test_clip_vocabulary_has_clips_size_and_layout():
    from export.tiny import clip_tokenizers

    vocab, merges = sdxl.clip_vocabulary()
    assert len(vocab) == 49408 and len(merges) == 49408 - 512 - 2
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)  # as CLIP's
    assert sorted(vocab.values()) == list(range(49408))
    tokenizer, tokenizer_2 = clip_tokenizers(vocab, merges)
    ids = tokenizer("a photo of an astronaut riding a horse").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and max(ids) == 49407  # transformers pools at the largest id
    assert len(tokenizer) == len(tokenizer_2) == 49408 and tokenizer_2.pad_token == "!"
    assert sdxl.clip_vocabulary() == (vocab, merges), "deterministic"


def test_lora_has_the_lcm_lora_shape():
    from peft import LoraConfig

    unet = sdxl.build_component("unet", device="meta")
    unet.add_adapter(LoraConfig(r=sdxl.LCM_LORA_RANK, lora_alpha=sdxl.LCM_LORA_RANK,
                                target_modules=sdxl.LCM_LORA_TARGET_MODULES), adapter_name="lcm")
    parameters = sum(p.numel() for name, p in unet.named_parameters() if ".lcm." in name)
    assert parameters == sdxl.LCM_LORA_PARAMETERS and abs(parameters - 197e6) < 0.5e6  # the model card's 197 M


def test_random_tiny_is_the_tiny_alias(tmp_path):
    assert main(["random", str(tmp_path / "a"), "--arch", "tiny", "--seed", "3"]) == 0
    assert main(["tiny", str(tmp_path / "b"), "--seed", "3"]) == 0
    from safetensors.torch import load_file

    for path in sorted((tmp_path / "a").rglob("*.safetensors")):
        a, b = load_file(path), load_file(tmp_path / "b" / path.relative_to(tmp_path / "a"))
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], path


def test_unknown_arch(capsys):
    with pytest.raises(SystemExit):
        main(["random", "/tmp/unused", "--arch", "sd15"])
    assert "invalid choice: 'sd15'" in capsys.readouterr().err


def test_lora_sites_of_sdxl():
    """Every Linear and Conv2d of SDXL's UNet and text encoders is a LoRA site (contract/loras.py):
    794 in the UNet (51 convolutions), 265 in the text encoders; rank 64 over all of them is the
    published 197 M parameters of an all-layers SDXL LoRA."""
    from contract.loras import sites_of

    modules = {name: sdxl.build_component(name, device="meta") for name in ("text_encoder", "text_encoder_2", "unet")}
    unet, text = sites_of("unet", modules), sites_of("text_encoder", modules)
    assert (len(unet.sites), sum(s.kind == "conv" for s in unet.sites), len(text.sites)) == (794, 51, 265)
    assert (unet.lora_in, unet.lora_out, text.lora_in, text.lora_out) == (1_593_892, 1_494_404, 452_864, 452_864)
    assert round(64 * (unet.lora_in + unet.lora_out) / 1e6) == 198
