"""What a user would otherwise run: diffusers' StableDiffusionXLPipeline with the recipe's scheduler
(LCMScheduler unless told), built as the model cards build it (contract/recipes.py)."""

from __future__ import annotations

import numpy as np
import torch


def recipe_scheduler(pipe, kind: str = "lcm"):
    import diffusers

    from contract.recipes import SCHEDULERS

    spec = SCHEDULERS[kind]
    class_name = spec.class_name or pipe.scheduler.config["_class_name"]  # `model`: the pipeline's own
    return getattr(diffusers, class_name).from_config(pipe.scheduler.config, **spec.overrides)


def diffusers_images(
    pipe, prompt: str, *, seed: int, steps: int = 4, guidance: float = 1.0, negative: str = "",
    height: int = 128, width: int = 128, num_images: int = 1, scheduler: str = "lcm", eta: float | None = None,
) -> np.ndarray:
    """uint8 [N, H, W, 3], one CPU generator per image seeded seed + i, as PIL conversion rounds."""
    from diffusers import StableDiffusionXLPipeline

    components = {**pipe.components, "scheduler": recipe_scheduler(pipe, scheduler)}
    reference = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = reference(
            prompt,
            negative_prompt=negative or None,  # None, not "": the empty negative prompt is zeros
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            num_images_per_prompt=num_images,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)],
            output_type="np",
            **({} if eta is None else {"eta": eta}),  # the pipeline's default eta is 0.0
        ).images
    return (images * 255).round().astype(np.uint8)


def diffusers_from_image(
    pipe, prompt: str, *, image: np.ndarray, seed: int, steps: int, strength: float, mask: np.ndarray | None = None,
    guidance: float = 1.0, negative: str = "", num_images: int = 1, scheduler: str = "lcm", eta: float | None = None,
) -> np.ndarray:
    """uint8 [N, H, W, 3] from diffusers' StableDiffusionXLImg2ImgPipeline, or with a mask its
    StableDiffusionXLInpaintPipeline, given the image (and mask) as PIL images, as an application would."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
    from PIL import Image

    cls = StableDiffusionXLImg2ImgPipeline if mask is None else StableDiffusionXLInpaintPipeline
    components = {**pipe.components, "scheduler": recipe_scheduler(pipe, scheduler)}
    reference = cls(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    height, width = image.shape[:2]
    extra = {} if mask is None else {"mask_image": Image.fromarray(mask, mode="L"), "height": height, "width": width}
    with torch.no_grad():
        images = reference(
            prompt, image=Image.fromarray(image, mode="RGB"), strength=strength, negative_prompt=negative or None,
            num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=num_images,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)], output_type="np",
            **extra, **({} if eta is None else {"eta": eta}),
        ).images
    return (images * 255).round().astype(np.uint8)


def sample_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB picture with an edge (what an init image looks like to a VAE), uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(seed)
    red, green = 255 * (0.5 + 0.5 * np.sin(6 * x + rng.uniform(0, 3))), 255 * y
    blue = np.where(x + y > 0.8, 220.0, 30.0)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def sample_mask(height: int, width: int) -> np.ndarray:
    """Repaint a centred rectangle (255), keep the rest (0), with a few grey values either side of 128."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
    mask[0, :4] = (127, 128, 200, 60)
    return mask


def reference_cfg_truncated(
    pipe, prompt: str, *, seed: int, steps: int, guidance: float, cfg_end_fraction: float, negative: str = "",
    height: int = 128, width: int = 128, scheduler: str = "lcm", eta: float | None = None,
) -> np.ndarray:
    """One image, written out from diffusers' parts as Baseten's end_cfg loop does: CFG for the
    first int(steps * fraction) steps, then the conditional UNet pass alone."""
    import inspect

    from diffusers.utils.torch_utils import randn_tensor

    kind = scheduler
    scheduler = recipe_scheduler(pipe, kind)
    scheduler.set_timesteps(steps)
    accepted = inspect.signature(scheduler.step).parameters
    extra = {"eta": 0.0 if eta is None else eta} if "eta" in accepted else {}
    with torch.no_grad():
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt, negative_prompt=negative or None, device="cpu", do_classifier_free_guidance=True
        )
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, dtype=embeds.dtype) * scheduler.init_noise_sigma
        guided_steps = int(steps * cfg_end_fraction)
        for i, t in enumerate(scheduler.timesteps):
            if i < guided_steps:
                noise = pipe.unet(scheduler.scale_model_input(torch.cat([latents] * 2), t), t, torch.cat([negative_embeds, embeds]), added_cond_kwargs={
                    "text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": torch.cat([time_ids] * 2)}).sample
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
            else:
                noise = pipe.unet(scheduler.scale_model_input(latents, t), t, embeds,
                                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            latents = scheduler.step(noise, t, latents, generator=generator, **extra).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        image = pipe.image_processor.postprocess(image, output_type="np")
    return (image * 255).round().astype(np.uint8)


def diffusers_ensemble_images(
    pipe, refiner_unet, prompt: str, *, seed: int, steps: int, high_noise_frac: float, guidance: float = 5.0,
    negative: str = "", height: int = 128, width: int = 128, num_images: int = 1, scheduler: str = "model",
    image: np.ndarray | None = None, strength: float | None = None,
) -> np.ndarray:
    """uint8 [N, H, W, 3] from diffusers' "ensemble of experts", as the SDXL base model card runs it:
    the base's StableDiffusionXLPipeline to `denoising_end=high_noise_frac` (latents out), then the
    refiner's StableDiffusionXLImg2ImgPipeline from `denoising_start=high_noise_frac` on them, with
    the base's text_encoder_2, tokenizer_2 and VAE, the refiner's model_index.json settings
    (requires_aesthetics_score, force_zeros_for_empty_prompt false), a scheduler of the same class and
    config, and the same generators going on. 1.0: the base alone (diffusers' own cut excludes it).
    `image` (uint8 [H, W, 3]) and `strength`: the base is the img2img pipeline, with both."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from PIL import Image

    base_class = StableDiffusionXLPipeline if image is None else StableDiffusionXLImg2ImgPipeline
    base = base_class(**{**pipe.components, "scheduler": recipe_scheduler(pipe, scheduler)},
                      force_zeros_for_empty_prompt=True, add_watermarker=False)
    size = dict(height=height, width=width) if image is None else dict(image=Image.fromarray(image, mode="RGB"), strength=strength)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=pipe.vae, text_encoder=None, text_encoder_2=pipe.text_encoder_2, tokenizer=None, tokenizer_2=pipe.tokenizer_2,
        unet=refiner_unet, scheduler=recipe_scheduler(pipe, scheduler), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    for stage in (base, refiner):
        stage.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    common = dict(negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                  num_images_per_prompt=num_images, generator=generators)
    with torch.no_grad():
        if high_noise_frac >= 1.0:
            images = base(prompt, **size, output_type="np", **common).images
        else:
            latents = base(prompt, **size, denoising_end=high_noise_frac, output_type="latent", **common).images
            images = refiner(prompt, image=latents, denoising_start=high_noise_frac, output_type="np", **common).images
    return (images * 255).round().astype(np.uint8)


def diffusers_controlnet_images(
    pipe, controlnets: list, prompt: str, *, control_images: list[np.ndarray], seed: int, steps: int = 4,
    scales: list[float] | None = None, starts: list[float] | None = None, ends: list[float] | None = None,
    guidance: float = 1.0, negative: str = "", num_images: int = 1, image: np.ndarray | None = None,
    strength: float | None = None, mask: np.ndarray | None = None, scheduler: str = "lcm",
) -> np.ndarray:
    """uint8 [N, H, W, 3] from diffusers' StableDiffusionXLControlNetPipeline (with `image`, an init image:
    StableDiffusionXLControlNetImg2ImgPipeline; with a `mask` too: StableDiffusionXLControlNetInpaintPipeline),
    the images given as PIL images, as an application would; one ControlNet as itself, several as a list
    (diffusers' MultiControlNetModel)."""
    from diffusers import (StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetInpaintPipeline,
                           StableDiffusionXLControlNetPipeline)
    from PIL import Image

    count = len(controlnets)
    cls = (StableDiffusionXLControlNetPipeline if image is None else
           StableDiffusionXLControlNetImg2ImgPipeline if mask is None else StableDiffusionXLControlNetInpaintPipeline)
    components = {**pipe.components, "scheduler": recipe_scheduler(pipe, scheduler)}
    reference = cls(**components, controlnet=controlnets[0] if count == 1 else controlnets,
                    force_zeros_for_empty_prompt=True, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    controls = [Image.fromarray(control, mode="RGB") for control in control_images]
    one = (lambda values: values[0]) if count == 1 else (lambda values: values)
    height, width = control_images[0].shape[:2]
    extra = {"height": height, "width": width} if image is None else {"image": Image.fromarray(image, mode="RGB"),
                                                                      "strength": strength}
    if mask is not None:
        extra.update(mask_image=Image.fromarray(mask, mode="L"), height=height, width=width)
    with torch.no_grad():
        images = reference(
            prompt, **{"image" if image is None else "control_image": one(controls)}, **extra,
            negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
            num_images_per_prompt=num_images, generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)],
            controlnet_conditioning_scale=one(scales or [1.0] * count), control_guidance_start=one(starts or [0.0] * count),
            control_guidance_end=one(ends or [1.0] * count), output_type="np",
        ).images
    return (images * 255).round().astype(np.uint8)


def diffusers_union_images(
    pipe, union, prompt: str, *, control_images: list[np.ndarray], modes: list[int], seed: int, steps: int = 4,
    scales: list[float] | None = None, starts: list[float] | None = None, ends: list[float] | None = None,
    guidance: float = 1.0, negative: str = "", num_images: int = 1,
) -> np.ndarray:
    """uint8 [N, H, W, 3] from diffusers' StableDiffusionXLControlNetUnionPipeline with one ControlNet-Union
    and its `modes` (control_mode=[...]: one pass), one image, scale and window per mode."""
    from diffusers import StableDiffusionXLControlNetUnionPipeline
    from PIL import Image

    count = len(modes)
    components = {**pipe.components, "scheduler": recipe_scheduler(pipe, "lcm")}
    reference = StableDiffusionXLControlNetUnionPipeline(**components, controlnet=union, force_zeros_for_empty_prompt=True,
                                                         add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    height, width = control_images[0].shape[:2]
    with torch.no_grad():
        images = reference(
            prompt, control_image=[Image.fromarray(control, mode="RGB") for control in control_images], control_mode=list(modes),
            height=height, width=width, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
            num_images_per_prompt=num_images, generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)],
            controlnet_conditioning_scale=scales or [1.0] * count, control_guidance_start=starts or [0.0] * count,
            control_guidance_end=ends or [1.0] * count, output_type="np",
        ).images
    return (images * 255).round().astype(np.uint8)


def example_depth_map(depth_estimator, processor, image: np.ndarray) -> np.ndarray:
    """The control map of diffusers' SDXL depth ControlNet example (its get_depth_map), with the
    transformers depth model and processor given: the prediction resized to the image's size (bicubic),
    scaled by its minimum and maximum, on three channels, x 255 and truncated to uint8."""
    from PIL import Image

    pixel_values = processor(images=Image.fromarray(image), return_tensors="pt").pixel_values
    with torch.no_grad():
        depth_map = depth_estimator(pixel_values).predicted_depth
    depth_map = torch.nn.functional.interpolate(depth_map.unsqueeze(1), size=image.shape[:2], mode="bicubic", align_corners=False)
    depth_min = torch.amin(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_max = torch.amax(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_map = (depth_map - depth_min) / (depth_max - depth_min)
    image = torch.cat([depth_map] * 3, dim=1).permute(0, 2, 3, 1).cpu().numpy()[0]
    return (image * 255.0).clip(0, 255).astype(np.uint8)


def diffusers_ip_adapter_images(
    pipe, adapter_file, prompt: str, *, ip_image: np.ndarray, seed: int, steps: int = 4, scale=1.0, guidance: float = 1.0,
    negative: str = "", height: int = 128, width: int = 128, num_images: int = 1, image_encoder=None,
    image: np.ndarray | None = None, strength: float | None = None,
) -> np.ndarray:
    """uint8 [N, H, W, 3] from diffusers' StableDiffusionXLPipeline after `load_ip_adapter(adapter_file)` and
    `set_ip_adapter_scale(scale)` (a number, or a per-block dict as InstantStyle's), the image prompt given as
    a PIL image, as an application would. The pipeline's UNet is copied (the loader replaces its attention
    processors); `image_encoder`: the adapter's (default: `pipe.image_encoder`, as conftest.exported sets it);
    `image`: an init image, StableDiffusionXLImg2ImgPipeline's (with `strength`)."""
    import copy
    from pathlib import Path

    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from PIL import Image

    adapter_file = Path(adapter_file)
    components = {**pipe.components, "unet": copy.deepcopy(pipe.unet), "scheduler": recipe_scheduler(pipe),
                  "image_encoder": image_encoder if image_encoder is not None else pipe.image_encoder,
                  "feature_extractor": None}  # the loader registers CLIPImageProcessor(224) as with h94's encoders
    cls = StableDiffusionXLPipeline if image is None else StableDiffusionXLImg2ImgPipeline
    reference = cls(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    extra = {"height": height, "width": width} if image is None else {"image": Image.fromarray(image, mode="RGB"), "strength": strength}
    reference.load_ip_adapter(str(adapter_file.parent), subfolder="", weight_name=adapter_file.name, image_encoder_folder=None)
    reference.set_ip_adapter_scale(scale)
    with torch.no_grad():
        images = reference(
            prompt, ip_adapter_image=Image.fromarray(ip_image, mode="RGB"), negative_prompt=negative or None,
            num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=num_images, **extra,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)], output_type="np",
        ).images
    return (images * 255).round().astype(np.uint8)
