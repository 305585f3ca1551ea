"""SDXL base 1.0's exact architecture with random weights: production sizes without the hub.

The configs below are the published ones of `stabilityai/stable-diffusion-xl-base-1.0` (unet/,
vae/, text_encoder/, text_encoder_2/ and tokenizer*/ config files; keys that equal the classes'
defaults are left out), so every shape, graph and engine built from this pipeline is SDXL's:
2,567,463,684 UNet parameters, CLIP ViT-L (123,060,480) and OpenCLIP bigG with projection
(694,659,840), an 8x VAE (83,653,863). The weights are each class's own random initialization:
they measure memory and time, which do not depend on the values.

Written component by component, each built straight in fp16 and freed once saved, so memory never
holds more than the largest component (the UNet, about 5.1 GB). Beside it, as `python -m export tiny`
does: `lora/`, a random LoRA with the LCM-LoRA SDXL's rank and target modules (196.75 M parameters,
the published 197 M), `alt_vae/`, a VAE with the fp16-fix VAE's config (force_upcast off),
`safety_checker/`, CompVis's safety checker architecture (export/safety_checker.py), and `refiner/`,
the SDXL refiner's UNet (2.26 B parameters, about 4.5 GB in fp16).
"""

from __future__ import annotations

import gc
import json
import string
from contextlib import contextmanager
from pathlib import Path

from .progress import log, step

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + 1280 pooled
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "act_fn": "silu",
}

# stabilityai/stable-diffusion-xl-refiner-1.0, unet/config.json: four levels of 384 to 1536 channels,
# four transformer blocks per attention block, text_encoder_2's 1280-wide hidden states alone, five
# time ids (the aesthetic score last). 2,259,526,660 parameters, counted on the meta device.
REFINER_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [384, 768, 1536, 1536],
    "layers_per_block": 2,
    "transformer_layers_per_block": 4,
    "attention_head_dim": [6, 12, 24, 24],
    "cross_attention_dim": 1280,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2560,  # 5 time ids x 256 + 1280 pooled
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "act_fn": "silu",
}
REFINER_UNET_PARAMETERS = 2_259_526_660

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,  # the original SDXL VAE overflows in fp16
}
# madebyollin/sdxl-vae-fp16-fix, config.json: the same network, fine-tuned to stay finite in fp16.
FP16_FIX_VAE_CONFIG = {**VAE_CONFIG, "sample_size": 512, "force_upcast": False}

_CLIP_COMMON = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    # The published files keep CLIP's legacy ids; with eos_token_id 2 transformers pools at the
    # largest token id, which is <|endoftext|> (49407) in CLIP's vocabulary and in ours.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# stabilityai/stable-diffusion-xl-base-1.0, text_encoder/config.json: CLIP ViT-L/14's text tower.
TEXT_ENCODER_CONFIG = {
    **_CLIP_COMMON,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# stabilityai/stable-diffusion-xl-base-1.0, text_encoder_2/config.json: OpenCLIP ViT-bigG/14's, with projection.
TEXT_ENCODER_2_CONFIG = {
    **_CLIP_COMMON,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

# madebyollin/taesdxl, config.json: AutoencoderTiny's defaults (TAESD's layout) with SDXL's scaling
# factor 1.0; the streaming endpoint's preview decoder.
PREVIEW_VAE_CONFIG = {
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "scaling_factor": 1.0,
    "act_fn": "relu",
    "upsampling_scaling_factor": 2,
}

# Published parameter counts (the tests build the classes on the meta device and compare).
PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}

# latent-consistency/lcm-lora-sdxl: rank 64 on the modules diffusers' train_lcm_distill_lora_sdxl.py
# targets; on SDXL's UNet that is 196.75 M parameters, the model card's 197 M.
LCM_LORA_RANK = 64
LCM_LORA_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip
LCM_LORA_PARAMETERS = 196_751_360
# Standard deviation of the random LoRA's factors: the fused change is then a few percent of SDXL's
# weights (rank 64: about 8e-4 per weight against about 1e-2), as a trained LoRA's is.
LORA_FACTOR_STD = 0.01

CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 word-final bytes + 48,894 merges + 2 specials


def clip_vocabulary(size: int = CLIP_VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format byte-level BPE vocabulary of exactly `size` tokens, laid out as CLIP's.

    The merges learned from the tiny pipeline's corpus come first (prompts split into words), then
    letter sequences in order (2 letters, 3 letters...), each a valid merge of two earlier tokens,
    until the vocabulary is full. Deterministic: no corpus download, same file every time.
    """
    from .tiny import BOS, EOS, train_clip_bpe

    learned_vocab, learned_merges = train_clip_bpe()
    tokens = [t for t in learned_vocab if t not in (BOS, EOS)]
    known = set(tokens)
    merges = list(learned_merges)
    wanted_merges = size - 2 - 512
    for left, right in _letter_merges():
        if len(merges) == wanted_merges:
            break
        if left in known and right in known and left + right not in known:
            merges.append((left, right))
            tokens.append(left + right)
            known.add(left + right)
    if len(merges) != wanted_merges:
        raise RuntimeError(f"internal: built {len(merges)} merges, wanted {wanted_merges}")
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def _letter_merges():
    """(prefix, letter) and (prefix, letter</w>) pairs, prefixes of growing length."""
    letters = string.ascii_lowercase
    prefixes = list(letters)
    while True:
        longer = []
        for prefix in prefixes:
            for letter in letters:
                yield prefix, letter
                yield prefix, letter + "</w>"
                longer.append(prefix + letter)
        prefixes = longer


@contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_component(name: str, *, dtype=None, device=None, vocab_size: int = CLIP_VOCAB_SIZE):
    """One SDXL component built with its class's random init, straight in `dtype` on `device`
    ("meta": shapes only, no memory). Names: unet, refiner_unet, vae, alt_vae, preview_vae, text_encoder, text_encoder_2."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    builders = {
        "preview_vae": lambda: AutoencoderTiny(**PREVIEW_VAE_CONFIG),
        "unet": lambda: UNet2DConditionModel(**UNET_CONFIG),
        "refiner_unet": lambda: UNet2DConditionModel(**REFINER_UNET_CONFIG),
        "vae": lambda: AutoencoderKL(**VAE_CONFIG),
        "alt_vae": lambda: AutoencoderKL(**FP16_FIX_VAE_CONFIG),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**{**TEXT_ENCODER_CONFIG, "vocab_size": vocab_size})),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**{**TEXT_ENCODER_2_CONFIG, "vocab_size": vocab_size})),
    }
    if name not in builders:
        raise KeyError(f"unknown SDXL component {name!r}; known: {', '.join(builders)}")
    with _default_dtype(dtype or torch.float32), torch.device(device or "cpu"):
        return builders[name]().eval()


def scheduler_config() -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json (EulerDiscreteScheduler)."""
    from .tiny import sdxl_scheduler

    return dict(sdxl_scheduler().config)


def write_sdxl(out_dir: Path, seed: int = 0) -> None:
    """Write the random-weight SDXL pipeline (fp16 safetensors), `lora/`, `alt_vae/`, `preview_vae/`,
    `safety_checker/` and `refiner/` (the SDXL refiner's UNet) under `out_dir`."""
    import torch
    from diffusers import EulerDiscreteScheduler

    from .tiny import clip_tokenizers, write_random_lora

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with step("tokenizers (49,408-token CLIP vocabularies)"):
        tokenizer, tokenizer_2 = clip_tokenizers(*clip_vocabulary())
        tokenizer.save_pretrained(out_dir / "tokenizer")
        tokenizer_2.save_pretrained(out_dir / "tokenizer_2")
    EulerDiscreteScheduler.from_config(scheduler_config()).save_pretrained(out_dir / "scheduler")
    # Each component from its own seed, so one can be rebuilt alone with the same weights.
    for offset, name in enumerate(("text_encoder", "text_encoder_2", "vae", "unet")):
        with step(f"{name}: random init in fp16 and save"):
            torch.manual_seed(seed * 100 + offset)
            module = build_component(name, dtype=torch.float16)
            module.save_pretrained(out_dir / name, safe_serialization=True)
            if name == "unet":
                torch.manual_seed(seed * 100 + 10)
                lora = write_random_lora(module, out_dir / "lora", seed=seed + 1, rank=LCM_LORA_RANK, alpha=LCM_LORA_RANK,
                                         target_modules=LCM_LORA_TARGET_MODULES, scale=LORA_FACTOR_STD)
                log(f"LCM-LoRA-shaped random LoRA (rank {LCM_LORA_RANK}) written to {lora}")
            del module
            gc.collect()
    with step("alt_vae (the fp16-fix VAE's config): random init in fp16 and save"):
        torch.manual_seed(seed * 100 + 20)
        build_component("alt_vae", dtype=torch.float16).save_pretrained(out_dir / "alt_vae", safe_serialization=True)
    with step("preview_vae (madebyollin/taesdxl's config): random init in fp16 and save"):
        torch.manual_seed(seed * 100 + 30)
        build_component("preview_vae", dtype=torch.float16).save_pretrained(out_dir / "preview_vae", safe_serialization=True)
    with step("safety_checker (CompVis/stable-diffusion-safety-checker's config): random init and save in fp16"):
        from .safety_checker import build_safety_checker, image_processor, write_safety_checker
        from .sources import SAFETY_CHECKER_SUBFOLDER

        write_safety_checker(out_dir / SAFETY_CHECKER_SUBFOLDER, build_safety_checker(full_size=True, seed=seed * 100 + 40).half(),
                             image_processor())
    with step("refiner (stabilityai/stable-diffusion-xl-refiner-1.0's UNet config): random init in fp16 and save"):
        from .sources import REFINER_SUBFOLDER

        torch.manual_seed(seed * 100 + 50)
        build_component("refiner_unet", dtype=torch.float16).save_pretrained(out_dir / REFINER_SUBFOLDER, safe_serialization=True)
        gc.collect()
    _write_model_index(out_dir)
    log(f"random-weight SDXL base 1.0 architecture (seed {seed}) written to {out_dir}")


def _write_model_index(out_dir: Path) -> None:
    """model_index.json as StableDiffusionXLPipeline.save_pretrained writes it."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def parameter_counts(device: str = "meta") -> dict[str, int]:
    """Parameters per component, built on `device` (meta: no memory)."""
    return {name: sum(p.numel() for p in build_component(name, device=device).parameters()) for name in PARAMETERS}

