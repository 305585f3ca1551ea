"""What a user would otherwise run: diffusers' StableDiffusionXLPipeline with an LCMScheduler."""

from __future__ import annotations

import numpy as np
import torch


def diffusers_images(
    pipe, prompt: str, *, seed: int, steps: int = 4, guidance: float = 1.0, negative: str = "",
    height: int = 128, width: int = 128, num_images: int = 1,
) -> np.ndarray:
    """uint8 [N, H, W, 3], one CPU generator per image seeded seed + i, as PIL conversion rounds."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    components = {**pipe.components, "scheduler": LCMScheduler.from_config(pipe.scheduler.config)}
    lcm = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    lcm.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = lcm(
            prompt,
            negative_prompt=negative or None,  # None, not "": the empty negative prompt is zeros
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            num_images_per_prompt=num_images,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)],
            output_type="np",
        ).images
    return (images * 255).round().astype(np.uint8)
