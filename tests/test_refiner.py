"""The refiner's hand-off (serving/denoise.py) in-process: the loop with the base UNet, then the
refiner's, equals diffusers' "ensemble of experts" (base to denoising_end, refiner from
denoising_start) on the same weights, scheduler, steps, guidance and seeds. Runs the PyTorch modules
the graphs are exported from, so a mismatch here is the loop's fault."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from reference import diffusers_ensemble_images, recipe_scheduler

from contract.networks import ModelDims
from export.modules import TextEncoders, UNet, VaeDecoder
from export.sources import load_refiner
from serving.denoise import Denoiser, Refiner, denoise, handoff_index
from serving.endpoint import GenerationOptions
from serving.text import PromptTokenizer, texts_to_encode


@pytest.fixture(scope="module")
def refiner_unet(loaded, tiny_dir):
    pipe = loaded("fp32").pipe
    return load_refiner(str(tiny_dir / "refiner"), ModelDims.from_pipeline(pipe)).eval()


def refined_loop(pipe, refiner_unet, tiny_dir, prompt, negative, options, scheduler="model", cfg_end_fraction=1.0, init=None):
    texts = texts_to_encode(prompt, negative, options.do_classifier_free_guidance, refiner=True)
    ids = PromptTokenizer(tiny_dir)(texts)
    base, refiner = UNet(pipe.unet), UNet(refiner_unet, lora=False)
    with torch.no_grad():
        embeds, pooled = TextEncoders(pipe.text_encoder, pipe.text_encoder_2)(*(torch.from_numpy(v) for v in ids.values()))
        setup = Refiner(recipe_scheduler(pipe, scheduler), options.high_noise_frac, pipe.text_encoder_2.config.hidden_size)
        denoiser = Denoiser(options, embeds, pooled, recipe_scheduler(pipe, scheduler), refiner=setup,
                            cfg_end_fraction=cfg_end_fraction, init=init)
        networks = []

        def run(module):
            return lambda inputs: networks.append(module) or module(**inputs)

        latents = denoise(run(base), denoiser, refiner=run(refiner))
        return VaeDecoder(pipe.vae)(latents).numpy(), [n is refiner for n in networks]


CASES = {
    "20 steps, CFG 5, empty negative prompt": ("a photo of a cat", "", GenerationOptions(42, 20, 5.0, 128, 128, 1)),
    "CFG, negative prompt, 2 images, non-square": ("a red rose", "blurry", GenerationOptions(7, 10, 5.0, 128, 192, 2)),
    "no CFG": ("a city at night", "", GenerationOptions(3, 8, 1.0, 128, 128, 1)),
}


@pytest.mark.parametrize("frac", [0.8, 0.5, 1.0])
@pytest.mark.parametrize("case", CASES)
def test_loop_with_refiner_matches_diffusers_expert_ensemble(loaded, tiny_dir, refiner_unet, case, frac):
    pipe = loaded("fp32").pipe
    prompt, negative, options = CASES[case]
    options = replace(options, high_noise_frac=frac, has_negative_prompt=bool(negative))
    ours, refined = refined_loop(pipe, refiner_unet, tiny_dir, prompt, negative, options)
    theirs = diffusers_ensemble_images(pipe, refiner_unet, prompt, seed=options.seed, steps=options.num_inference_steps,
                                       high_noise_frac=frac, guidance=options.guidance_scale, negative=negative,
                                       height=options.height, width=options.width, num_images=options.num_images_per_prompt)
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    steps, scheduler = options.num_inference_steps, recipe_scheduler(pipe, "model")
    scheduler.set_timesteps(steps)
    base_steps = handoff_index(scheduler.timesteps, scheduler.config.num_train_timesteps, frac)
    assert refined == [False] * base_steps + [True] * (steps - base_steps)  # one switch, at the hand-off
    assert (base_steps == steps) == (frac == 1.0) and base_steps > 0


def test_handoff_counts_as_diffusers_cuts():
    """SDXL's Euler, leading spacing, 20 steps: timesteps 951, 901, ..., 1; 0.8 cuts at 200: 16 base steps."""
    from export.tiny import sdxl_scheduler

    scheduler = sdxl_scheduler()
    scheduler.set_timesteps(20)
    assert [handoff_index(scheduler.timesteps, 1000, f) for f in (0.8, 0.5, 0.05, 0.001, 0.999, 1.0)] == [16, 10, 1, 0, 20, 20]


def test_the_refiner_changes_the_image(loaded, tiny_dir, refiner_unet):
    """Beyond rounding: the refiner's steps ran (the random UNets' last steps change little)."""
    pipe = loaded("fp32").pipe
    options = GenerationOptions(5, 10, 5.0, 128, 128, 1, has_negative_prompt=False)
    alone, _ = refined_loop(pipe, refiner_unet, tiny_dir, "a cat", "", replace(options, high_noise_frac=1.0))
    refined, _ = refined_loop(pipe, refiner_unet, tiny_dir, "a cat", "", replace(options, high_noise_frac=0.5))
    assert np.abs(alone.astype(int) - refined.astype(int)).max() > 2


def test_engine_batches_each_network_with_its_own_peers(loaded, tiny_dir, refiner_unet):
    """Requests at base steps and at refiner steps in one engine: every call runs one network (the
    refiner's inputs are 5 time ids wide), a request with a refiner and one without share the
    base's calls, and each request's latents equal its own run."""
    from serving.engine import Job, StepEngine

    pipe = loaded("fp32").pipe
    ids = PromptTokenizer(tiny_dir)(["a cat", "blurry"])
    with torch.no_grad():
        embeds, pooled = TextEncoders(pipe.text_encoder, pipe.text_encoder_2)(*(torch.from_numpy(v) for v in ids.values()))
    base, refiner = UNet(pipe.unet), UNet(refiner_unet, lora=False)
    width = pipe.text_encoder_2.config.hidden_size

    def make(seed, frac):
        options = GenerationOptions(seed, 6, 5.0, 128, 128, 1, high_noise_frac=frac, has_negative_prompt=True)
        setup = None if frac is None else Refiner(recipe_scheduler(pipe, "model"), frac, width)
        return Denoiser(options, embeds, pooled, recipe_scheduler(pipe, "model"), refiner=setup)

    kinds = [(1, 0.5), (2, None), (3, 0.8)]
    with torch.no_grad():
        alone = [denoise(lambda i: base(**i), make(*k), refiner=lambda i: refiner(**i)) for k in kinds]
        calls = []

        def record(module, name):
            return lambda inputs: calls.append((name, inputs["time_ids"].shape[1], inputs["sample"].shape[0])) or module(**inputs)

        engine = StepEngine(record(base, "unet"), max_rows=8, refiner=record(refiner, "refiner_unet"))
        results = {}
        for index, kind in enumerate(kinds):
            engine.submit(Job(make(*kind), on_done=lambda latents, i=index: results.__setitem__(i, latents),
                              on_error=lambda error: pytest.fail(str(error))))
        while len(results) < len(kinds):
            engine.run_iteration()
    for index, latents in enumerate(alone):
        assert (results[index] - latents).abs().max() < 1e-3  # batched and alone: fp32 rounding only
    assert all(width_ids == (5 if name == "refiner_unet" else 6) for name, width_ids, _ in calls)
    assert ("unet", 6, 6) in calls  # the three requests' first steps in one call (CFG: 2 rows each)
    assert any(name == "refiner_unet" and rows == 4 for name, _, rows in calls)  # both refined requests together


@pytest.mark.parametrize("strength", [0.6, 0.2])
def test_img2img_with_refiner_matches_diffusers(loaded, tiny_dir, refiner_unet, strength):
    """The base's img2img pipeline to denoising_end, then the refiner: at 0.6 of 10 steps the base runs
    steps 5 to 8 and the refiner 9 and 10; at 0.2 the image starts past the cut (the last 2 steps):
    the refiner runs both, as diffusers' refiner from denoising_start continues the base's latents."""
    from reference import sample_image
    from test_img2img import init_image

    pipe = loaded("fp32").pipe
    options = GenerationOptions(4, 10, 5.0, 128, 128, 1, strength=strength, high_noise_frac=0.8, has_negative_prompt=True)
    image = sample_image(128, 128)
    ours, refined = refined_loop(pipe, refiner_unet, tiny_dir, "a watercolor", "blurry", options,
                                 init=init_image(pipe, image, strength, None))
    if strength == 0.2:  # diffusers' base cannot run no step at all (its latent timestep would be empty)
        assert refined == [True, True]
        return
    theirs = diffusers_ensemble_images(pipe, refiner_unet, "a watercolor", seed=4, steps=10, high_noise_frac=0.8,
                                       negative="blurry", image=image, strength=strength)
    assert refined == [False] * 4 + [True] * 2
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
