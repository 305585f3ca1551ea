"""Random safety checkers of diffusers' StableDiffusionSafetyChecker architecture, written beside the
random pipelines (`python -m export random` / `tiny`) in the layout of
`CompVis/stable-diffusion-safety-checker`: config.json + weights + preprocessor_config.json.

A checker's flags come from its concept embeddings and their thresholds. Random ones flag nothing
(the class initializes every embedding to ones and every threshold to 1.0), which would leave the
flag and black-out paths untested; so the tiny checker's concept and special-care embeddings are
random, and one threshold of each kind is set to the median distance of the tiny pipeline's own
images (`calibrate`): about half of its images are flagged, some through the special-care
adjustment. Full-size random checkers keep thresholds of 1.0 (they measure time and memory).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .progress import log

# CompVis/stable-diffusion-safety-checker, config.json (keys equal to the classes' defaults left out):
# CLIP ViT-L/14's vision tower (303 M parameters) and a 768-wide projection.
COMPVIS_VISION_CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                         "num_hidden_layers": 24, "patch_size": 14, "image_size": 224}
COMPVIS_TEXT_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}
COMPVIS_PROJECTION_DIM = 768
# Small widths, CLIP's 224-pixel input (the network's fixed size), 7x7 patches of 32 pixels.
TINY_VISION_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                      "patch_size": 32, "image_size": 224}
TINY_TEXT_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
TINY_PROJECTION_DIM = 16


def build_safety_checker(full_size: bool, seed: int, device: str | None = None):
    """A StableDiffusionSafetyChecker with its class's random init, concept embeddings drawn from
    N(0, 1) (the init's ones would make every concept the same)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    vision, text, projection = ((COMPVIS_VISION_CONFIG, COMPVIS_TEXT_CONFIG, COMPVIS_PROJECTION_DIM) if full_size
                                else (TINY_VISION_CONFIG, TINY_TEXT_CONFIG, TINY_PROJECTION_DIM))
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for embeds in (checker.concept_embeds, checker.special_care_embeds):
            embeds.copy_(torch.randn(embeds.shape, generator=generator))
    return checker.eval()


def image_processor():
    """CompVis's preprocessor_config.json: CLIPImageProcessor's defaults (224 shortest edge, bicubic,
    224x224 center crop, CLIP's mean and std), with PIL."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil()


def distances(checker, processor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(concept, special-care) cosine distances of uint8 images [N, H, W, 3], as diffusers computes them."""
    import torch
    from PIL import Image

    from .modules import SafetyCheckerGraph

    pixels = processor([Image.fromarray(image) for image in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        concept, special = SafetyCheckerGraph(checker)(pixels)
    return concept.numpy(), special.numpy()


def calibrate(checker, processor, images: np.ndarray) -> None:
    """Concept 0's and special-care concept 0's thresholds at the median distance of `images`; the
    other concepts' at 1.0 (never flagged: a cosine is at most 1)."""
    import torch

    concept, special = distances(checker, processor, images)
    with torch.no_grad():
        for weights, values in ((checker.concept_embeds_weights, concept), (checker.special_care_embeds_weights, special)):
            weights.fill_(1.0)
            weights[0] = float(np.median(values[:, 0]))


def pipeline_images(pipe, lora_dir: Path, vae_dir: Path) -> np.ndarray:
    """Eight 128x128 images of the tiny pipeline as the demo serves it (LoRA fused, the alternative
    VAE, LCM, 2 steps): what the tiny checker is calibrated on. Changes `pipe` so (write_tiny has
    saved it already)."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler

    from .sources import _diffusers_errors_only

    with _diffusers_errors_only(on=False):  # its notes that the LoRA has no text-encoder weights
        pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.vae = AutoencoderKL.from_pretrained(str(vae_dir))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    images = [pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=128, width=128, output_type="np",
                   generator=torch.Generator().manual_seed(seed)).images[0]
              for seed in range(4) for prompt in ("a photo of a cat", "a lighthouse by the sea")]
    return (np.stack(images) * 255).round().astype(np.uint8)


def write_safety_checker(out_dir: Path, checker, processor) -> Path:
    out_dir = Path(out_dir)
    checker.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    log(f"safety checker (StableDiffusionSafetyChecker, random) written to {out_dir}")
    return out_dir
