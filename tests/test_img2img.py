"""img2img and inpainting without a server: the loop (vae_encoder module, Denoiser from an init image,
decode) equals diffusers' StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline for
every scheduler of the recipes; the continuous-batching engine steps text-to-image, img2img and
inpainting requests in one UNet call; the endpoint's checks of image, strength and mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import diffusers_from_image, recipe_scheduler, sample_image, sample_mask

from contract.limits import Limits
from export.modules import TextEncoders, UNet, VaeDecoder, VaeEncoder
from serving.denoise import Denoiser, InitImage, denoise
from serving.endpoint import GenerationOptions, InvalidInput, check_options
from serving.engine import Job, StepEngine
from serving.text import PromptTokenizer, texts_to_encode

SCHEDULERS = [("lcm", None), ("euler-ancestral", None), ("euler", None), ("tcd", 0.3), ("ddim", None)]
CASES = {  # (steps, strength, guidance, images, height, width)
    "4 steps at 0.5, CFG, 2 images, non-square": (4, 0.5, 2.0, 2, 128, 192),
    "3 steps at 1.0, no CFG, 1 image": (3, 1.0, 1.0, 1, 128, 128),
}


def init_image(pipe, image: np.ndarray, strength: float, mask: np.ndarray | None) -> InitImage:
    """What the scheduler model makes of a request's image and mask (serving/triton/scheduler_model.py)."""
    with torch.no_grad():
        mean, std = VaeEncoder(pipe.vae)(torch.from_numpy(image)[None])
    binary = None if mask is None else torch.from_numpy((mask >= 128).astype(np.float32))[None, None]
    return InitImage(mean, std, strength, binary)


def run_loop(pipe, tiny_dir, prompt: str, negative: str, options: GenerationOptions, image, mask, scheduler="lcm", eta=None):
    ids = PromptTokenizer(tiny_dir)(texts_to_encode(prompt, negative, options.do_classifier_free_guidance))
    with torch.no_grad():
        embeds, pooled = TextEncoders(pipe.text_encoder, pipe.text_encoder_2)(*(torch.from_numpy(v) for v in ids.values()))
        denoiser = Denoiser(options, embeds, pooled, recipe_scheduler(pipe, scheduler), eta=eta,
                            init=init_image(pipe, image, options.strength, mask))
        unet = UNet(pipe.unet)
        return VaeDecoder(pipe.vae)(denoise(lambda inputs: unet(**inputs), denoiser)).numpy()


def options_of(case: tuple, seed: int, inpainting: bool) -> GenerationOptions:
    steps, strength, guidance, images, height, width = case
    return GenerationOptions(seed, steps, guidance, height, width, images, strength=strength, inpainting=inpainting)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("scheduler, eta", SCHEDULERS)
def test_loop_matches_diffusers(loaded, tiny_dir, scheduler, eta, kind, case):
    pipe = loaded("fp32").pipe
    options = options_of(CASES[case], seed=5, inpainting=kind == "inpaint")
    image = sample_image(options.height, options.width)
    mask = sample_mask(options.height, options.width) if kind == "inpaint" else None
    negative = "blurry" if options.do_classifier_free_guidance else ""
    ours = run_loop(pipe, tiny_dir, "a cat on a sofa", negative, options, image, mask, scheduler, eta)
    theirs = diffusers_from_image(pipe, "a cat on a sofa", image=image, mask=mask, seed=5, steps=options.num_inference_steps,
                                  strength=options.strength, guidance=options.guidance_scale, negative=negative,
                                  num_images=options.num_images_per_prompt, scheduler=scheduler, eta=eta)
    assert ours.shape == theirs.shape == (options.num_images_per_prompt, options.height, options.width, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # fp32 rounding at .5 boundaries only


def test_the_image_steers_the_result_and_the_mask_keeps_its_region(loaded, tiny_dir):
    """Teeth for the parity above: another image gives another result (the tiny random UNet's
    prediction dominates, so by little: 2.4 levels on average, measured); inpainting keeps more of
    the unmasked region than of the masked one."""
    pipe = loaded("fp32").pipe
    image, other = sample_image(128, 128, seed=0), 255 - sample_image(128, 128, seed=1)
    options = GenerationOptions(3, 4, 1.0, 128, 128, 1, strength=0.25)
    low = run_loop(pipe, tiny_dir, "a cat", "", options, image, None)[0].astype(int)
    assert np.abs(low - run_loop(pipe, tiny_dir, "a cat", "", options, other, None)[0].astype(int)).mean() > 1
    mask = sample_mask(128, 128)
    painted = run_loop(pipe, tiny_dir, "a cat", "", GenerationOptions(3, 4, 1.0, 128, 128, 1, strength=1.0, inpainting=True),
                       image, mask)[0].astype(int)
    kept, repainted = mask < 128, mask >= 128
    error = np.abs(painted - image.astype(int)).mean(axis=-1)
    assert error[kept].mean() < error[repainted].mean()


def test_img2img_image_i_depends_on_seed_plus_i_alone(loaded, tiny_dir):
    """img2img draws image i's latents and noise from generator i (diffusers' order with a list of
    generators); inpainting does not (the pipeline encodes with generator 0: docs/img2img.md)."""
    pipe = loaded("fp32").pipe
    image = sample_image(128, 128)
    two = run_loop(pipe, tiny_dir, "a cat", "", GenerationOptions(20, 4, 1.0, 128, 128, 2, strength=0.6), image, None)
    second = run_loop(pipe, tiny_dir, "a cat", "", GenerationOptions(21, 4, 1.0, 128, 128, 1, strength=0.6), image, None)
    assert np.abs(two[1].astype(int) - second[0].astype(int)).max() <= 1


def test_engine_steps_the_three_kinds_in_one_unet_call(loaded):
    """A text-to-image, an img2img (starting at step 3 of 4) and an inpainting request (step 2 of 4)
    admitted together share their first UNet call, and each ends with the latents it gets alone."""
    pipe = loaded("fp32").pipe
    unet = UNet(pipe.unet)

    def unet_fn(inputs):
        with torch.no_grad():
            return unet(**inputs)

    image, mask = sample_image(128, 128), sample_mask(128, 128)
    kinds = [(GenerationOptions(1, 4, 1.0, 128, 128, 1), None),
             (GenerationOptions(2, 4, 2.0, 128, 128, 2, strength=0.5), init_image(pipe, image, 0.5, None)),
             (GenerationOptions(3, 4, 1.0, 128, 128, 1, strength=0.75, inpainting=True), init_image(pipe, image, 0.75, mask))]

    def make(options, init):
        generator = torch.Generator().manual_seed(options.seed)
        rows = 2 if options.do_classifier_free_guidance else 1
        embeds, pooled = torch.randn(rows, 77, 80, generator=generator), torch.randn(rows, 40, generator=generator)
        return Denoiser(options, embeds, pooled, recipe_scheduler(pipe, "lcm"), init=init)

    with torch.no_grad():
        alone = [denoise(unet_fn, make(*kind)) for kind in kinds]
    assert [make(*kind).start_index for kind in kinds] == [0, 2, 1]
    results, jobs_per_call = {}, []
    engine = StepEngine(unet_fn, max_rows=8, on_iteration=lambda stats: jobs_per_call.append(stats.jobs))
    for index, kind in enumerate(kinds):
        engine.submit(Job(make(*kind), on_done=lambda latents, i=index: results.__setitem__(i, latents), on_error=pytest.fail))
    with torch.no_grad():
        while len(results) < len(kinds):
            engine.run_iteration()
    assert jobs_per_call[0] == 3, jobs_per_call
    assert sum(jobs_per_call) == 4 + 2 + 3  # each request's steps, no more: the part-way ones skip theirs
    for index, latents in results.items():
        assert torch.allclose(latents, alone[index], atol=1e-4, rtol=1e-4), (index, (latents - alone[index]).abs().max())


def test_vae_graphs_attention_in_slices_equals_diffusers_and_leaves_the_vae_as_it_was(loaded):
    """The VAE modules run their attention in query slices (what the graphs hold, so that 1536x1536
    fits in memory): the same numbers as diffusers' own attention, and the pipeline's VAE keeps its
    processors (the diffusers references of every parity test run the original)."""
    vae = loaded("fp32").pipe.vae
    before = {name: type(processor) for name, processor in vae.attn_processors.items()}
    assert before and "ChunkedSelfAttention" not in {t.__name__ for t in before.values()}
    images = torch.from_numpy(sample_image(128, 192))[None]
    with torch.no_grad():
        mean, std = VaeEncoder(vae)(images)
        pixels = 2 * (images.permute(0, 3, 1, 2).float() / 255) - 1
        expected = vae.encode(pixels).latent_dist
        decoded = VaeDecoder(vae)(mean)
        reference = vae.decode(mean / vae.config.scaling_factor).sample
    assert torch.allclose(mean, expected.mean * vae.config.scaling_factor, atol=1e-6)
    assert torch.allclose(std, expected.std * vae.config.scaling_factor, atol=1e-6)
    reference = ((reference * 0.5 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).to(torch.uint8)
    assert (decoded.int() - reference.int()).abs().max() <= 1
    assert {name: type(processor) for name, processor in vae.attn_processors.items()} == before


# --- the endpoint's checks ----------------------------------------------------------------------

LIMITS = Limits(min_size=128, max_size=512)
IMAGE = np.zeros((128, 192, 3), np.uint8)
BAD = {
    "four channels": (dict(image=np.zeros((128, 128, 4), np.uint8)), "image: '<uint8 [128, 128, 4]>' is not accepted; "
                      "expected an RGB image, UINT8 [H, W, 3], H and W each a multiple of 64 from 128 to 512"),
    "float pixels": (dict(image=np.zeros((128, 128, 3), np.float32)), "image: '<float32 [128, 128, 3]>' is not accepted"),
    "not a multiple of 64": (dict(image=np.zeros((128, 100, 3), np.uint8)), "image: '<128x100 pixels>' is not accepted"),
    "over the limit": (dict(image=np.zeros((576, 128, 3), np.uint8)), "image: '<576x128 pixels>' is not accepted"),
    "height disagrees": (dict(image=IMAGE, height=np.array([256], np.int32)),
                         "height: 256 is not accepted; expected 128 (the image's height) or no height"),
    "width disagrees": (dict(image=IMAGE, width=np.array([128], np.int32)), "width: 128 is not accepted; expected 192"),
    "strength 0": (dict(image=IMAGE, strength=np.array([0.0], np.float32)), "strength: 0.0 is not accepted; expected a number in (0, 1]"),
    "strength over 1": (dict(image=IMAGE, strength=np.array([1.5], np.float32)), "strength: 1.5 is not accepted"),
    "strength NaN": (dict(image=IMAGE, strength=np.array([math.nan], np.float32)), "strength: nan is not accepted"),
    "strength runs no step": (dict(image=IMAGE, strength=np.array([0.2], np.float32), num_inference_steps=np.array([4], np.int32)),
                              "strength: '0.2 with num_inference_steps 4' is not accepted; expected a strength of at least 0.25"),
    "default strength, 1 step": (dict(image=IMAGE, num_inference_steps=np.array([1], np.int32)),
                                 r"strength: '0.8 (the default) with num_inference_steps 1' is not accepted"),
    "strength without image": (dict(strength=np.array([0.5], np.float32)), "strength: 0.5 is not accepted; expected no strength without an image"),
    "mask without image": (dict(mask=np.zeros((128, 128), np.uint8)), "mask: '<uint8 [128, 128]>' is not accepted; expected a mask only with an image"),
    "mask of another size": (dict(image=IMAGE, mask=np.zeros((128, 128), np.uint8)),
                             "mask: '<uint8 [128, 128]>' is not accepted; expected UINT8 [128, 192], the image's height and width"),
    "mask with channels": (dict(image=IMAGE, mask=np.zeros((128, 192, 3), np.uint8)), "mask: '<uint8 [128, 192, 3]>' is not accepted"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_image_inputs_are_refused_naming_the_input(case):
    raw, message = BAD[case]
    with pytest.raises(InvalidInput) as refused:
        check_options(raw, LIMITS)
    assert str(refused.value).startswith(message), str(refused.value)


def test_image_inputs_set_size_strength_and_steps():
    options = check_options(dict(image=IMAGE, height=np.array([128], np.int32), num_inference_steps=np.array([4], np.int32)), LIMITS)
    assert (options.height, options.width, options.strength, options.denoising_steps, options.inpainting) == (128, 192, 0.8, 3, False)
    options = check_options(dict(image=IMAGE, mask=np.zeros((128, 192), np.uint8), strength=np.array([1.0], np.float32)), LIMITS)
    assert (options.strength, options.denoising_steps, options.inpainting) == (1.0, 4, True)
    plain = check_options({}, LIMITS)
    assert (plain.strength, plain.inpainting, plain.denoising_steps) == (None, False, 4)
    assert check_options(dict(image=IMAGE), Limits(min_size=128, max_size=512, default_strength=0.5)).strength == 0.5
