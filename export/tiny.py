"""A tiny random-weight SDXL pipeline, built offline in seconds, for tests and the CPU demo.

Same classes and wiring as SDXL base 1.0 (two CLIP text encoders, the second with projection;
`text_time` added conditioning; cross-attention transformer blocks; an 8x VAE), small widths.
The widths differ from one another on purpose (text_encoder 32, text_encoder_2 48, projection 40), so
a concatenation in the wrong order or a wrong hidden state shows up as a shape error.

Written in diffusers layout with `save_pretrained`, so the real loading code (`from_pretrained`,
`load_lora_weights`, `fuse_lora`) runs on it. Next to it: a random LoRA for its UNet (`lora/`) and a
second VAE (`alt_vae/`) that stands in for the fp16-fix VAE, and a TAESD-style AutoencoderTiny
(`preview_vae/`) that stands in for madebyollin/taesdxl, the streaming endpoint's preview decoder,
a safety checker of StableDiffusionSafetyChecker's architecture (`safety_checker/`), and a UNet with
the SDXL refiner's conditioning (`refiner/`) that stands in for stabilityai/stable-diffusion-xl-refiner-1.0.
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch

from .progress import log

# Words the tiny tokenizers learn their merges from: enough for prompts to split into a mix of
# whole words and pieces, as with the real 49,408-token CLIP vocabulary.
_CORPUS = """
a photo of an astronaut riding a horse on the moon, highly detailed, digital art, trending
a cinematic portrait of a cat wearing a hat, studio lighting, sharp focus, 8k, photorealistic
a watercolor painting of a lighthouse by the sea at sunset, soft colors, masterpiece
an oil painting of a mountain landscape with a river and a forest, golden hour, dramatic sky
blurry, low quality, bad anatomy, deformed, ugly, watermark, text, jpeg artifacts, cropped
a futuristic city at night with neon lights and flying cars, cyberpunk, rain, reflections
a close up of a red rose with water drops, macro photography, bokeh, vibrant
"""
_NUM_MERGES = 300
_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def train_clip_bpe(corpus: str = _CORPUS, num_merges: int = _NUM_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format byte-level BPE vocabulary: bytes, bytes + `</w>`, learned merges, specials."""
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    words = collections.Counter(corpus.lower().replace(",", " , ").split())
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            symbols = splits[word]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the pair itself: deterministic
        merges.append(best)
        vocab.append("".join(best))
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = tuple(merged)
    vocab += [BOS, EOS]
    return {token: i for i, token in enumerate(vocab)}, merges


def clip_tokenizers(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from transformers import CLIPTokenizer

    def make(pad_token: str):
        return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=_MAX_LENGTH)

    # As in SDXL base: tokenizer pads with <|endoftext|>, tokenizer_2 with "!".
    return make(EOS), make("!")


def _text_encoders(vocab: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(
        vocab_size=len(vocab),
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        max_position_embeddings=_MAX_LENGTH,
        num_hidden_layers=3,  # SDXL reads the penultimate layer: at least two are needed
        layer_norm_eps=1e-5,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act="quick_gelu", **common)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=48, intermediate_size=96, num_attention_heads=4, hidden_act="gelu", projection_dim=40, **common
        )
    )
    return text_encoder, text_encoder_2


# SSD-1B's UNet layout (segmind/SSD-1B unet/config.json): SDXL's three levels and two resnets per
# down block, fewer transformer blocks per attention block than SDXL's 2 and 10 (down: 2, 2 at the
# middle level, 4, 4 at the lowest; up: 4, 4, 10 at the lowest, 2, 1, 1 at the middle), and a mid block
# of one resnet without attention (UNetMidBlock2D). Here with the tiny widths.
SSD_1B_LAYOUT = dict(
    layers_per_block=2,
    transformer_layers_per_block=(1, (2, 2), (4, 4)),
    reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1)),
    mid_block_type="UNetMidBlock2D",
)
TINY_LAYOUT = dict(layers_per_block=1, transformer_layers_per_block=(1, 1, 2))
LAYOUTS = {"tiny": TINY_LAYOUT, "ssd-1b": SSD_1B_LAYOUT}


def _unet(text_dim: int, pooled_dim: int, arch: str = "tiny"):
    from diffusers import UNet2DConditionModel

    addition_time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        # SDXL's three levels: no attention at full latent resolution, attention below.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        **LAYOUTS[arch],
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=text_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + pooled_dim,
        norm_num_groups=32,
    )


def tiny_refiner_unet(refiner_text_dim: int, pooled_dim: int):
    """A UNet with the SDXL refiner's conditioning at tiny widths: text_encoder_2's hidden states alone
    (cross_attention_dim), five time ids (the aesthetic score last) with the pooled embeddings; its
    own layout (two resnets per block, one transformer block), as the refiner's differs from the base's."""
    from diffusers import UNet2DConditionModel

    from contract.networks import REFINER_TIME_IDS_DIM

    addition_time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64), layers_per_block=2, transformer_layers_per_block=1,
        attention_head_dim=(2, 4, 4), cross_attention_dim=refiner_text_dim, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=REFINER_TIME_IDS_DIM * addition_time_embed_dim + pooled_dim,
        norm_num_groups=32,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # four levels: the same 8x as SDXL's VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=128,
        scaling_factor=0.13025,  # SDXL VAE's
        force_upcast=False,  # as the fp16-fix VAE
    )


def tiny_preview_vae():
    """A TAESD-style AutoencoderTiny at tiny widths: TAESD's layout (an 8x decoder of 3, 3, 3, 1 blocks
    with nearest upsampling) with 8 channels instead of 64 and one block per level."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)


def sdxl_scheduler():
    """SDXL base 1.0's scheduler/scheduler_config.json, less the keys this class ignores."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )


def build_tiny_pipeline(seed: int = 0, arch: str = "tiny"):
    """The tiny SDXL pipeline in memory, fp32, weights drawn from `seed`; `arch` ssd-1b: SSD-1B's UNet layout."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    vocab, merges = train_clip_bpe()
    tokenizer, tokenizer_2 = clip_tokenizers(vocab, merges)
    text_encoder, text_encoder_2 = _text_encoders(vocab)
    text_dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    unet = _unet(text_dim, text_encoder_2.config.projection_dim, arch)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


# What LCM-LoRA SDXL adapts in the UNet: attention, feed-forward, projections, convs, time embeddings.
LORA_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
]  # fmt: skip


def write_random_lora(
    unet, out_dir: Path, seed: int, rank: int = 4, alpha: float = 8.0, scale: float = 0.05,
    target_modules: list[str] = LORA_TARGET_MODULES,
) -> Path:
    """A random UNet LoRA in the file format `load_lora_weights` reads (PEFT keys, the UNet's dtype);
    `unet` is left unchanged. `scale`: the standard deviation of both low-rank factors."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    adapter = f"random_{seed}"
    unet.add_adapter(config, adapter_name=adapter)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if f"lora_A.{adapter}" in name or f"lora_B.{adapter}" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    dtype = unet.dtype
    state = {name: value.to(dtype) for name, value in get_peft_model_state_dict(unet, adapter_name=adapter).items()}
    StableDiffusionXLPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=state,
        unet_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    unet.delete_adapters(adapter)
    return out_dir / "pytorch_lora_weights.safetensors"


TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _random_adapter(model, config, adapter: str, generator, scale: float) -> dict:
    """Add a PEFT adapter to `model`, fill it with N(0, scale) weights, return its state dict (the
    model's dtype) and remove it again."""
    from peft.utils import get_peft_model_state_dict

    model.add_adapter(config, adapter_name=adapter)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_A.{adapter}" in name or f"lora_B.{adapter}" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    state = {name: value.to(model.dtype) for name, value in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)  # the layers as they were, not PEFT wrappers without adapters
    if hasattr(model, "peft_config"):
        del model.peft_config
    for flag in ("_hf_peft_config_loaded",):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return state


def write_style_lora(
    pipe, out_dir: Path, seed: int, *, rank: int = 4, alpha: float = 4.0, scale: float = 0.05,
    unet_targets: list[str] = LORA_TARGET_MODULES, text_encoders: bool = True, kohya: bool = False,
) -> Path:
    """A random style LoRA for `pipe` (left unchanged): its UNet and, with `text_encoders`, both
    CLIP encoders. `kohya`: written as kohya/A1111 files are (`lora_unet_...`, `lora_te1_...`,
    `lora_te2_...` keys, `.lora_down`/`.lora_up`, one `.alpha` per layer), else diffusers/PEFT's
    format. Either is read back through diffusers' own loaders; only this writer knows the keys."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(seed)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(unet_targets), init_lora_weights=True)
    states = {"unet": _random_adapter(pipe.unet, unet_config, f"style_{seed}", generator, scale)}
    te_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_ENCODER_LORA_TARGETS, init_lora_weights=True)
    if text_encoders:
        for component in ("text_encoder", "text_encoder_2"):
            states[component] = _random_adapter(getattr(pipe, component), te_config, f"style_{seed}", generator, scale)
    out_dir = Path(out_dir)
    if not kohya:
        StableDiffusionXLPipeline.save_lora_weights(
            out_dir, unet_lora_layers=states["unet"], text_encoder_lora_layers=states.get("text_encoder"),
            text_encoder_2_lora_layers=states.get("text_encoder_2"), unet_lora_adapter_metadata=unet_config.to_dict(),
            text_encoder_lora_adapter_metadata=te_config.to_dict() if text_encoders else None,
            text_encoder_2_lora_adapter_metadata=te_config.to_dict() if text_encoders else None, safe_serialization=True)
        return out_dir / "pytorch_lora_weights.safetensors"
    from safetensors.torch import save_file

    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya_state = {}
    for component, state in states.items():
        for key, value in state.items():
            module, _, part = key.removeprefix(f"{component}.").rpartition(".lora_")
            name = prefixes[component] + module.replace(".", "_")
            kohya_state[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            kohya_state[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=value.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state, str(out_dir / "kohya_lora.safetensors"))
    return out_dir / "kohya_lora.safetensors"


def write_tiny(out_dir: Path, seed: int = 0, arch: str = "tiny") -> None:
    """Write the tiny pipeline, its LoRA (`lora/`), a second VAE (`alt_vae/`), a preview VAE
    (`preview_vae/`, an AutoencoderTiny), a safety checker calibrated on the pipeline's images
    (`safety_checker/`, export/safety_checker.py), a refiner UNet (`refiner/`) and a ControlNet
    (`controlnet/`), a ControlNet-Union (`controlnet_union/`), a depth estimator (`depth_estimator/`) and
    two IP-Adapters (`ip_adapter/`: the plain one and Plus) with their image encoder (`image_encoder/`)
    under `out_dir`."""
    from .safety_checker import build_safety_checker, calibrate, image_processor, pipeline_images, write_safety_checker
    from .depth import DEPTH_SUBFOLDER, write_tiny_depth_estimator
    from .ip_adapter import write_tiny_ip_adapters
    from .sources import CONTROLNET_SUBFOLDER, REFINER_SUBFOLDER, SAFETY_CHECKER_SUBFOLDER

    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(seed, arch)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    log(f"tiny {'SSD-1B-layout' if arch == 'ssd-1b' else 'SDXL'} pipeline (seed {seed}) written to {out_dir}")
    lora = write_random_lora(pipe.unet, out_dir / "lora", seed=seed + 1)
    log(f"random UNet LoRA written to {lora}")
    torch.manual_seed(seed + 2)
    tiny_vae().save_pretrained(out_dir / "alt_vae", safe_serialization=True)
    log(f"alternative VAE written to {out_dir / 'alt_vae'}")
    torch.manual_seed(seed + 3)
    tiny_preview_vae().save_pretrained(out_dir / "preview_vae", safe_serialization=True)
    log(f"preview VAE (AutoencoderTiny) written to {out_dir / 'preview_vae'}")
    checker, processor = build_safety_checker(full_size=False, seed=seed + 4), image_processor()
    calibrate(checker, processor, pipeline_images(pipe, out_dir / "lora", out_dir / "alt_vae"))
    write_safety_checker(out_dir / SAFETY_CHECKER_SUBFOLDER, checker, processor)
    torch.manual_seed(seed + 5)
    encoder_2 = pipe.text_encoder_2.config
    tiny_refiner_unet(encoder_2.hidden_size, encoder_2.projection_dim).save_pretrained(out_dir / REFINER_SUBFOLDER, safe_serialization=True)
    log(f"refiner UNet (the SDXL refiner's conditioning) written to {out_dir / REFINER_SUBFOLDER}")
    tiny_controlnet(pipe.unet, seed + 6).save_pretrained(out_dir / CONTROLNET_SUBFOLDER, safe_serialization=True)
    log(f"ControlNet (ControlNetModel.from_unet, random output convolutions) written to {out_dir / CONTROLNET_SUBFOLDER}")
    tiny_union_controlnet(pipe.unet, seed + 7).save_pretrained(out_dir / UNION_SUBFOLDER, safe_serialization=True)
    log(f"ControlNet-Union (ControlNetUnionModel, six control types) written to {out_dir / UNION_SUBFOLDER}")
    write_tiny_depth_estimator(out_dir / DEPTH_SUBFOLDER, seed + 8)
    write_tiny_ip_adapters(out_dir, pipe.unet, seed + 9)


# Published SDXL ControlNets (diffusers/controlnet-canny-sdxl-1.0 and the others) have this conditioning
# embedding; the tiny one narrower, with as many stages (len - 1 halvings = the VAE's factor of 8).
TINY_CONDITIONING_CHANNELS = (8, 16, 32, 32)


def tiny_controlnet(unet, seed: int):
    """A ControlNet for `unet` (diffusers' `ControlNetModel.from_unet`: its encoder's weights copied).
    from_unet zeroes the convolutions that feed the UNet (a new ControlNet adds nothing until trained):
    random ones here, so that the residuals a test compares are not zeros."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_CONDITIONING_CHANNELS)
    zeroed = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zeroed:
            conv.weight.normal_(std=0.05)
            conv.bias.normal_(std=0.01)
    return controlnet


UNION_SUBFOLDER = "controlnet_union"


def tiny_union_controlnet(unet, seed: int):
    """A ControlNet-Union for `unet` (xinsir's six control types), its encoder copied from the UNet as
    ControlNetUnionModel.from_unet does, its transformer as wide as the UNet's first block (from_unet
    keeps SDXL's 320) with 2 heads, and random weights where a new one has zeros (the output
    convolutions and the spatial projection), so that every mode's contribution shows."""
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed)
    width = unet.config.block_out_channels[0]
    template = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=TINY_CONDITIONING_CHANNELS)
    controlnet = ControlNetUnionModel.from_config(dict(template.config), num_trans_channel=width, num_proj_channel=width,
                                                  num_trans_head=2)
    copied = {key: value for key, value in template.state_dict().items() if controlnet.state_dict()[key].shape == value.shape}
    controlnet.load_state_dict(copied, strict=False)
    zeroed = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out,
              controlnet.spatial_ch_projs]
    with torch.no_grad():
        for layer in zeroed:
            layer.weight.normal_(std=0.05)
            layer.bias.normal_(std=0.01)
    return controlnet
