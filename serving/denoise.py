"""The denoising loop of diffusers' `StableDiffusionXLPipeline`, stage by stage, UNet outside, for
any of the recipes' schedulers (contract/recipes.py: LCM, Euler ancestral, Euler, TCD, DDIM).

Stages, as in `StableDiffusionXLPipeline.__call__`:
1. `prepare_conditioning`: the text embeddings repeated per image; with CFG the negative ones
   first (zeros when the negative prompt is empty: force_zeros_for_empty_prompt).
2. `make_time_ids`: SDXL's micro-conditioning (original size, crop (0, 0), target size).
3. `prepare_latents`: one CPU `torch.Generator` per image, seeded `seed + i`, draws that image's
   initial noise (scaled by the scheduler's init_noise_sigma); the same generators go to every
   `scheduler.step`, which draws each image's step noise (LCM, Euler ancestral, TCD and DDIM with
   eta > 0) row by row as the pipeline does. So image i depends on seed + i alone, not on what else
   is in the batch, and CPU and GPU draw the same numbers. `eta` goes to the schedulers whose step
   takes it, 0.0 unless the recipe sets it, as the pipeline's default.
4. `Denoiser`: one request's loop as a state machine (`unet_inputs()`, then `step(noise_pred)`),
   so a caller can run several requests' steps in one UNet batch. `denoise` runs it to the end.
   CFG truncation (Baseten's end_cfg, off by default): with `cfg_end_fraction` f < 1, CFG runs for
   the first int(f * steps) steps only; later steps send the UNet the conditional half alone.
5. The refiner (`Refiner`: recipe sdxl-base-refiner, diffusers' "ensemble of experts"): the base runs
   the timesteps at or above the cut of `high_noise_frac` f, int(round(T - f * T)) with T the
   scheduler's num_train_timesteps, as `StableDiffusionXLPipeline(denoising_end=f)` counts them; then
   the request switches to `refiner_unet` for the rest, with a fresh scheduler of the same class and
   config begun at the hand-off step, as `StableDiffusionXLImg2ImgPipeline(denoising_start=f)` runs
   them from the base's latents (no noise added; the same generators go on). The refiner's
   conditioning is text_encoder_2's part of the same text embeddings (the last refiner_text_dim
   columns, and the same pooled embeddings), with its own time ids (original size, crop, aesthetic
   score 6.0; 2.5 for the negative rows). The refiner encodes an empty negative prompt (its
   model_index.json: force_zeros_for_empty_prompt false), the base zeroes it: so with CFG and a
   refiner the text encoder's row 1 is always there, and the base uses zeros when the request's
   negative prompt was empty.
6. An init image (`InitImage`: img2img, and inpainting with a mask) starts the loop part-way through
   its schedule, as `StableDiffusionXLImg2ImgPipeline` and, for a 4-channel UNet,
   `StableDiffusionXLInpaintPipeline` do: the last int(steps * strength) steps run, from the image's
   latents noised to the first of them. img2img: image i's latents are drawn from generator i, then
   its noise. Inpainting: the pipeline encodes its one init image with the first generator only
   (then the masked image, whose latents a 4-channel UNet never reads, with it again), so image i's
   starting latents depend on seed + 0 too; after every step the kept region is replaced by the
   image's latents noised to the next timestep (latent blending).
7. ControlNets (`RequestControls`; serving/controlnets.py), as `StableDiffusionXLControlNetPipeline`
   with a list of ControlNets: at each step, the ControlNets inside their window run on the step's
   UNet rows (sample, timestep and conditioning as the UNet gets them, the control image on every
   row), and their residuals times their scales, summed in the order named, go to the UNet
   (`unet_control`). A step with none inside its window runs the UNet without residuals (diffusers'
   zero residuals add nothing). ControlNets apply to the base's steps (the refiner takes none). A
   ControlNet-Union's modes in a request take one pass per step, as StableDiffusionXLControlNetUnionPipeline
   with control_mode=[...] (serving/controlnets.py: how their scales and windows act).
8. An image prompt (`ImagePrompt`; serving/ip_adapters.py), as the pipeline after load_ip_adapter: its
   image tokens (negative ones first with CFG) and its scale per IP layer go with every base step's rows
   to `unet_ip`, which also takes the LoRA and ControlNet inputs (zeros where the request has none). The
   refiner's steps take none (an SDXL IP-Adapter adapts the base).
The VAE encode and decode are the `vae_encoder` and `vae_decoder` graphs' job (pixel conversion and
scaling included).
"""

from __future__ import annotations

import inspect
import itertools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from contract.networks import CONTROL_LEVELS, REFINER_TIME_IDS_DIM, REFINER_UNET, TIME_IDS_DIM, UNET
from .endpoint import Cancelled, GenerationOptions, denoising_steps

UNetFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # inputs named as networks.UNET -> noise_pred
# (the ControlNet's model, inputs named as its network's: networks.CONTROLNET or UNION_CONTROLNET) -> control_residuals
ControlNetFn = Callable[[str, dict[str, torch.Tensor]], torch.Tensor]


# A union ControlNet's control_groups value per request: unique among the live processes' requests
# (the process id above 32 bits), since Triton may batch calls of several loops into one run.
_CONTROL_GROUPS = itertools.count(os.getpid() << 32)


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def prepare_conditioning(
    prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, num_images: int, do_classifier_free_guidance: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 of the text encoder's output is the prompt; row 1, when present, the negative prompt."""
    embeds, pooled = prompt_embeds[:1].repeat(num_images, 1, 1), pooled_prompt_embeds[:1].repeat(num_images, 1)
    if not do_classifier_free_guidance:
        return embeds, pooled
    if prompt_embeds.shape[0] > 1:
        negative, negative_pooled = prompt_embeds[1:2].repeat(num_images, 1, 1), pooled_prompt_embeds[1:2].repeat(num_images, 1)
    else:
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    return torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])


def make_time_ids(height: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(original_height, original_width, crop_top, crop_left, target_height, target_width), [1, 6]."""
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    assert time_ids.shape[1] == TIME_IDS_DIM
    return time_ids


# StableDiffusionXLImg2ImgPipeline's defaults, with which the refiner was trained to be called.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def make_refiner_time_ids(height: int, width: int, score: float, dtype: torch.dtype, device) -> torch.Tensor:
    """(original_height, original_width, crop_top, crop_left, aesthetic_score), [1, 5]."""
    time_ids = torch.tensor([[height, width, 0, 0, score]], dtype=dtype, device=device)
    assert time_ids.shape[1] == REFINER_TIME_IDS_DIM
    return time_ids


def handoff_index(timesteps: torch.Tensor, num_train_timesteps: int, high_noise_frac: float) -> int:
    """How many steps of the schedule the base runs: those at or above diffusers' discrete cut of
    denoising_end (the refiner's denoising_start runs those below it). 1.0: every step."""
    if high_noise_frac >= 1.0:
        return len(timesteps)
    cutoff = int(round(num_train_timesteps - high_noise_frac * num_train_timesteps))
    return int((timesteps >= cutoff).sum())


@dataclass(frozen=True)
class Refiner:
    """What a request that the refiner finishes brings to the loop: a fresh scheduler of the base's
    class and config, the hand-off fraction, and the width of the refiner's text conditioning."""

    scheduler: object
    high_noise_frac: float
    text_dim: int


def draw_noise(generators: list[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """One sample of `shape` ([1, ...]) per generator, on the CPU, as diffusers' randn_tensor draws
    with a list of generators."""
    return torch.cat([torch.randn(shape, generator=g, dtype=dtype) for g in generators]).to(device)


def prepare_latents(
    generators: list[torch.Generator], channels: int, height: int, width: int, vae_scale_factor: int,
    dtype: torch.dtype, device, init_noise_sigma: float,
) -> torch.Tensor:
    shape = (1, channels, height // vae_scale_factor, width // vae_scale_factor)
    return draw_noise(generators, shape, dtype, device) * init_noise_sigma


@dataclass(frozen=True)
class InitImage:
    """What an img2img or inpainting request brings to the loop. `latent_mean`, `latent_std`: the
    init image's latent distribution from the vae_encoder graph, [1, C, h, w], already x the VAE's
    scaling factor; `mask`: inpainting, [1, 1, H, W] float32, 1 repaint, 0 keep (binarized)."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    strength: float
    mask: torch.Tensor | None = None

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """DiagonalGaussianDistribution.sample with `generator`, drawn in the distribution's dtype."""
        eps = torch.randn(tuple(self.latent_mean.shape), generator=generator, dtype=self.latent_mean.dtype)
        return self.latent_mean + self.latent_std * eps.to(self.latent_mean.device)


@dataclass
class Inpainting:
    """Latent blending (a 4-channel UNet's inpainting): the image's latents, the noise they were
    noised with, and the mask at latent size ([N, 1, h, w], 1 repaint)."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor

    def blend(self, scheduler, latents: torch.Tensor, timesteps: torch.Tensor, step_index: int) -> torch.Tensor:
        """After step `step_index`: the kept region is the image's latents noised to the next timestep
        (none after the last step)."""
        kept = self.image_latents
        if step_index < len(timesteps) - 1:
            kept = scheduler.add_noise(kept, self.noise, timesteps[step_index + 1:step_index + 2])
        return (1 - self.mask) * kept + self.mask * latents


@dataclass(frozen=True)
class RequestControls:
    """A request's ControlNets in its loop: each checked spec (serving.controlnets.ControlSpec) with its
    control image, [1, H, W, 3] uint8 on the loop's device; `lora_widths`: the UNet's LoRA input widths
    (unet_lora_in, unet_lora_out), for the zero LoRA weights unet_control takes from a request without LoRAs."""

    specs: tuple
    images: tuple[torch.Tensor, ...]
    lora_widths: tuple[int, int]


@dataclass(frozen=True)
class ControlCall:
    """One ControlNet model's part of a request's step: its inputs (named as the model's network's) and
    the scale its residuals take."""

    model: str
    inputs: dict
    scale: float

    @property
    def rows(self) -> int:
        return self.inputs["sample"].shape[0]


def step_kwargs(scheduler, generators: list[torch.Generator], eta: float | None) -> dict:
    """What the pipeline's prepare_extra_step_kwargs passes to `scheduler.step`: the generators and
    eta (default 0.0), each only where the scheduler's step takes it."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted:
        kwargs["eta"] = 0.0 if eta is None else eta
    return kwargs


class Denoiser:
    """One request's denoising loop. `scheduler`: a fresh diffusers scheduler of the recipe's class
    (it keeps per-request state); `eta`: the recipe's, for the schedulers whose step takes one."""

    def __init__(
        self, request: GenerationOptions, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
        scheduler, *, latent_channels: int = 4, vae_scale_factor: int = 8, cfg_end_fraction: float = 1.0,
        eta: float | None = None, lora: dict[str, torch.Tensor] | None = None, init: InitImage | None = None,
        refiner: Refiner | None = None, controls: RequestControls | None = None, image_prompt=None,
    ):
        """`lora`: the request's UNet LoRA weights for one sample (lora_down [1, rank, width], lora_up
        [1, width, rank]; serving/loras.py), sent with the base's rows; None: no LoRA (the plain `unet`).
        `init`: img2img or inpainting (the request's strength is init.strength). `refiner`: the
        refiner finishes the schedule from the hand-off step on. `controls`: the request's ControlNets.
        `image_prompt`: its IP-Adapter image prompt (serving.ip_adapters.ImagePrompt)."""
        device, dtype = prompt_embeds.device, prompt_embeds.dtype
        self.cfg = request.do_classifier_free_guidance
        self.guidance_scale = request.guidance_scale
        self.scheduler = scheduler
        scheduler.set_timesteps(request.num_inference_steps, device=device)
        self.timesteps = scheduler.timesteps
        self.generators = make_generators(request.seeds)
        base_negative = (prompt_embeds, pooled_prompt_embeds)
        if refiner is not None and not request.has_negative_prompt:  # row 1 is the refiner's "" (force zeros here)
            base_negative = (prompt_embeds[:1], pooled_prompt_embeds[:1])
        encoder_hidden_states, text_embeds = prepare_conditioning(*base_negative, request.num_images_per_prompt, self.cfg)
        time_ids = make_time_ids(request.height, request.width, dtype, device).repeat(encoder_hidden_states.shape[0], 1)
        # Each network's rows (negative ones first with CFG), named as its spec's inputs.
        self.conditioning = {"encoder_hidden_states": encoder_hidden_states, "text_embeds": text_embeds, "time_ids": time_ids}
        self.handoff, self.refiner = len(self.timesteps), refiner
        if refiner is not None:
            self.handoff = handoff_index(self.timesteps, scheduler.config.num_train_timesteps, refiner.high_noise_frac)
            self.refiner_conditioning = self._refiner_conditioning(request, prompt_embeds, pooled_prompt_embeds)
        self.start_index, self.inpainting = 0, None
        if init is None:
            self.latents = prepare_latents(
                self.generators, latent_channels, request.height, request.width, vae_scale_factor, dtype, device,
                scheduler.init_noise_sigma,
            )
        else:
            self.latents = self._latents_from_image(init, dtype)
        # CFG truncation counts the steps that run (an init image's request runs the last ones).
        self.cfg_steps = self.start_index + int((len(self.timesteps) - self.start_index) * cfg_end_fraction) if self.cfg else 0
        self.step_kwargs = step_kwargs(scheduler, self.generators, eta)
        self.lora = lora or {}
        self.controls = controls
        self.image_prompt = image_prompt
        self.control_group = next(_CONTROL_GROUPS) if controls is not None else None
        self.step_index = self.start_index
        self._follow_hand_off()  # an init image may start the request past the hand-off

    def _refiner_conditioning(self, request: GenerationOptions, prompt_embeds: torch.Tensor,
                              pooled_prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """encoder_hidden_states, text_embeds and time_ids of the refiner's rows (negative ones first)."""
        images, width = request.num_images_per_prompt, self.refiner.text_dim
        if self.cfg and prompt_embeds.shape[0] < 2:
            raise ValueError("the refiner needs the negative prompt's embeddings (row 1 of prompt_embeds) with CFG: "
                             "the tokenizer of a deployment with a refiner encodes it, empty or not")
        parts = [1, 0] if self.cfg else [0]
        scores = [NEGATIVE_AESTHETIC_SCORE, AESTHETIC_SCORE] if self.cfg else [AESTHETIC_SCORE]
        dtype, device = prompt_embeds.dtype, prompt_embeds.device
        return {
            "encoder_hidden_states": torch.cat([prompt_embeds[i:i + 1, :, -width:].repeat(images, 1, 1) for i in parts]),
            "text_embeds": torch.cat([pooled_prompt_embeds[i:i + 1].repeat(images, 1) for i in parts]),
            "time_ids": torch.cat([make_refiner_time_ids(request.height, request.width, score, dtype, device).repeat(images, 1)
                                   for score in scores]),
        }

    def _follow_hand_off(self) -> None:
        """At the first refiner step (the hand-off, or an init image's first step when that comes later)
        the refiner's scheduler takes over, begun at this step, as the refiner pipeline sets it up."""
        if not self.refining or self.done or self.scheduler is self.refiner.scheduler:
            return
        scheduler = self.refiner.scheduler
        scheduler.set_timesteps(len(self.timesteps), device=self.timesteps.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(self.step_index)
        self.scheduler = scheduler

    def _latents_from_image(self, init: InitImage, dtype: torch.dtype) -> torch.Tensor:
        """The pipelines' get_timesteps + prepare_latents (+ the inpaint pipeline's mask latents)."""
        steps = len(self.timesteps) // self.scheduler.order
        self.start_index = (steps - denoising_steps(steps, init.strength)) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(self.start_index)
        count, shape, device = len(self.generators), tuple(init.latent_mean.shape), init.latent_mean.device
        latent_timestep = self.timesteps[self.start_index:self.start_index + 1].repeat(count)
        if init.mask is None:  # img2img: each image's generator draws its latents, then its noise
            image_latents = torch.cat([init.sample(g) for g in self.generators]).to(dtype)
            noise = draw_noise(self.generators, shape, dtype, device)
            return self.scheduler.add_noise(image_latents, noise, latent_timestep)
        image_latents = init.sample(self.generators[0]).to(dtype).repeat(count, 1, 1, 1)
        noise = draw_noise(self.generators, shape, dtype, device)
        torch.randn(shape, generator=self.generators[0], dtype=init.latent_mean.dtype)  # the masked image's encode
        mask = torch.nn.functional.interpolate(init.mask, size=shape[2:]).to(device=device, dtype=dtype)
        self.inpainting = Inpainting(image_latents, noise, mask.repeat(count, 1, 1, 1))
        if init.strength == 1.0:  # the pipeline's is_strength_max: pure noise
            return noise * self.scheduler.init_noise_sigma
        return self.scheduler.add_noise(image_latents, noise, latent_timestep)

    @property
    def steps_done(self) -> int:
        return self.step_index - self.start_index

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def refining(self) -> bool:
        """Whether this step is the refiner's."""
        return self.step_index >= self.handoff

    @property
    def network(self) -> str:
        """The network this step runs: the UNet (unet, or unet_lora with LoRA weights) or the refiner's."""
        return REFINER_UNET.name if self.refining else UNET.name

    @property
    def guided(self) -> bool:
        """Whether this step runs CFG (the UNet sees negative and positive halves)."""
        return self.step_index < self.cfg_steps

    @property
    def unet_batch(self) -> int:
        return self.latents.shape[0] * (2 if self.guided else 1)

    def _network_inputs(self) -> dict[str, torch.Tensor]:
        """This step's sample, timestep and conditioning rows: what its network and its ControlNets take."""
        t = self.timesteps[self.step_index]
        sample = torch.cat([self.latents] * 2) if self.guided else self.latents
        sample = self.scheduler.scale_model_input(sample, t)
        rows = slice(None) if self.guided or not self.cfg else slice(self.latents.shape[0], None)  # positive half
        conditioning = self.refiner_conditioning if self.refining else self.conditioning
        return {
            "sample": sample,
            "timestep": t.to(torch.float32).expand(self.unet_batch).contiguous(),
            **{name: value[rows] for name, value in conditioning.items()},
        }

    def control_inputs(self) -> list[ControlCall]:
        """The ControlNet calls of this step, in the order the request named them, on base steps only:
        each ControlNet inside its window at a scale above 0 (its residuals x its scale); each union
        model's modes in one pass (serving/controlnets.py), unless all of them are at 0 or outside."""
        if self.controls is None or self.refining:
            return []
        index, count = self.step_index - self.start_index, len(self.timesteps) - self.start_index
        passes: dict[str, list] = {}  # model -> (spec, image, scale x keep) of each of its ControlNets, in order
        for spec, image in zip(self.controls.specs, self.controls.images):
            passes.setdefault(spec.model, []).append((spec, image, spec.scale * spec.runs_at(index, count)))
        runs = [(model, named) for model, named in passes.items() if any(kept > 0 for _, _, kept in named)]
        if not runs:
            return []
        inputs = self._network_inputs()
        rows = inputs["sample"].shape[0]
        calls = []
        for model, named in runs:
            if named[0][0].mode is None:  # plain ControlNets: one call each
                calls += [ControlCall(model, {**inputs, "controlnet_cond": image.expand(rows, -1, -1, -1)}, kept)
                          for _, image, kept in named if kept > 0]
            else:
                calls.append(self._union_call(model, named, inputs))
        return calls

    def _union_call(self, model: str, named: list, inputs: dict[str, torch.Tensor]) -> ControlCall:
        """One pass of a union model for its modes `named` ((spec, image, scale x keep) each): diffusers
        scales a lone mode's residuals after the network, several modes' conditions inside it."""
        rows, device = inputs["sample"].shape[0], self.latents.device
        lone = len(named) == 1
        union = {
            "controlnet_cond": torch.stack([image[0] for _, image, _ in named])[None].expand(rows, -1, -1, -1, -1),
            "control_modes": torch.tensor([[spec.mode for spec, _, _ in named]], device=device).expand(rows, -1),
            "control_mode_scales": torch.tensor([[1.0 if lone else kept for _, _, kept in named]], device=device).expand(rows, -1),
            "control_groups": torch.full((rows,), self.control_group, dtype=torch.int64, device=device),
        }
        return ControlCall(model, {**inputs, **union}, named[0][2] if lone else 1.0)

    def unet_inputs(self, control_residuals: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The inputs of this step's network (`network`), named as its spec's; with `control_residuals`
        (the step's ControlNets' residuals, scaled and summed: controlled_unet_inputs), unet_control's; with
        an image prompt, unet_ip's (zero residuals on a step without ControlNets)."""
        inputs = self._network_inputs()
        if self.refining:
            return inputs
        inputs.update({name: value.expand(self.unet_batch, -1, -1) for name, value in self.lora.items()})
        dtype, device = inputs["sample"].dtype, self.latents.device
        if self.image_prompt is not None:
            inputs.update(self.image_prompt.rows(self.latents.shape[0], self.guided))
            if control_residuals is None:  # unet_ip takes residuals: zeros add nothing
                patches = (self.latents.shape[2] >> CONTROL_LEVELS) * (self.latents.shape[3] >> CONTROL_LEVELS)
                control_residuals = torch.zeros(self.unet_batch, self.image_prompt.widths[2] * patches, dtype=dtype, device=device)
        if control_residuals is not None:
            inputs["control_residuals"] = control_residuals
            if "lora_down" not in inputs:  # unet_control and unet_ip take LoRA inputs: a zero rank adds nothing
                width_in, width_out = self.controls.lora_widths if self.controls is not None else self.image_prompt.widths[:2]
                inputs["lora_down"] = torch.zeros(self.unet_batch, 1, width_in, dtype=dtype, device=device)
                inputs["lora_up"] = torch.zeros(self.unet_batch, width_out, 1, dtype=dtype, device=device)
        return inputs

    def step(self, noise_pred: torch.Tensor) -> None:
        if self.guided:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance_scale * (text - uncond)
        t = self.timesteps[self.step_index]
        self.latents = self.scheduler.step(noise_pred, t, self.latents, **self.step_kwargs, return_dict=False)[0]
        if self.inpainting is not None:
            self.latents = self.inpainting.blend(self.scheduler, self.latents, self.timesteps, self.step_index)
        self.step_index += 1
        self._follow_hand_off()


def concat_unet_inputs(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several requests' UNet inputs as one batch: rows concatenated. When any request has LoRAs,
    the batch carries LoRA weights (for `unet_lora`): each request's rank axis padded with zeros
    to the largest, and zeros for the requests without (a zero rank adds nothing). When any has
    ControlNet residuals, the batch carries them (for `unet_control`): zeros for the requests without. When
    any has an image prompt, the batch carries image tokens and scales (for `unet_ip`): zeros for the rows
    without (they add exactly nothing), and so residuals and LoRA weights too (a request with an image
    prompt carries both)."""
    with_ip = [i for i in inputs if "ip_tokens" in i]
    if with_ip:
        tokens, scales = with_ip[0]["ip_tokens"], with_ip[0]["ip_layer_scales"]
        inputs = [i if "ip_tokens" in i else {**i, "ip_tokens": tokens.new_zeros(i["sample"].shape[0], *tokens.shape[1:]),
                                               "ip_layer_scales": scales.new_zeros(i["sample"].shape[0], scales.shape[1])}
                  for i in inputs]
    with_control = [i for i in inputs if "control_residuals" in i]
    if with_control:
        width, sample = with_control[0]["control_residuals"].shape[1], with_control[0]["control_residuals"]
        inputs = [i if "control_residuals" in i else {**i, "control_residuals": sample.new_zeros(i["sample"].shape[0], width)}
                  for i in inputs]
    with_lora = [i for i in inputs if "lora_down" in i]
    if not with_lora:
        return {name: torch.cat([i[name] for i in inputs]) for name in inputs[0]}
    rank = max(i["lora_down"].shape[1] for i in with_lora)
    down, up = with_lora[0]["lora_down"], with_lora[0]["lora_up"]

    def lora_of(given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = given["sample"].shape[0]
        if "lora_down" not in given:
            return {"lora_down": down.new_zeros(rows, rank, down.shape[2]), "lora_up": up.new_zeros(rows, up.shape[1], rank)}
        pad = rank - given["lora_down"].shape[1]
        return {"lora_down": torch.nn.functional.pad(given["lora_down"], (0, 0, 0, pad)),
                "lora_up": torch.nn.functional.pad(given["lora_up"], (0, pad))}

    padded = [{**i, **lora_of(i)} for i in inputs]
    return {name: torch.cat([i[name] for i in padded]) for name in padded[0]}


def controlled_unet_inputs(denoisers: list[Denoiser], controlnet: ControlNetFn | None, max_rows: int = 0) -> list[dict[str, torch.Tensor]]:
    """Each denoiser's inputs for this step's network, with its ControlNets' residuals where it has
    ControlNets at this step: one `controlnet` call per ControlNet model for the rows of every request
    that runs it (at most `max_rows` rows a call, a request's rows never split; 0: no bound), then, per
    request, each call's residuals times its scale, summed in the order the request named them."""
    wanted = [d.control_inputs() for d in denoisers]
    residuals: list[list] = [[None] * len(w) for w in wanted]
    places: dict[str, list[tuple[int, int, ControlCall]]] = {}  # model -> (request, its k-th call, the call)
    for j, calls in enumerate(wanted):
        for k, call in enumerate(calls):
            places.setdefault(call.model, []).append((j, k, call))
    for model, placed in places.items():
        if controlnet is None:
            raise ValueError(f"a request's step runs ControlNet {model}, but no ControlNet runner is given")
        for chunk in _row_chunks(placed, lambda place: place[2].rows, max_rows):
            result, start = controlnet(model, _control_feed([call.inputs for _, _, call in chunk])), 0
            for j, k, call in chunk:
                residuals[j][k], start = result[start:start + call.rows], start + call.rows
    inputs = []
    for denoiser, calls, outputs in zip(denoisers, wanted, residuals):
        total = None
        for call, residual in zip(calls, outputs):
            scaled = residual * call.scale
            total = scaled if total is None else total + scaled
        inputs.append(denoiser.unet_inputs(total))
    return inputs


def _control_feed(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several requests' inputs of one ControlNet model as one call: rows concatenated; for a union
    model, each request's mode slots padded to the most (empty slots: mode -1, scale 0, a black image)."""
    if "control_modes" in inputs[0]:
        slots = max(i["control_modes"].shape[1] for i in inputs)
        inputs = [_pad_slots(given, slots) for given in inputs]
    return {name: torch.cat([i[name] for i in inputs]) for name in inputs[0]}


def _pad_slots(given: dict[str, torch.Tensor], slots: int) -> dict[str, torch.Tensor]:
    rows, missing = given["control_modes"].shape[0], slots - given["control_modes"].shape[1]
    if not missing:
        return given
    images = given["controlnet_cond"]
    return {**given,
            "controlnet_cond": torch.cat([images, images.new_zeros(rows, missing, *images.shape[2:])], dim=1),
            "control_modes": torch.nn.functional.pad(given["control_modes"], (0, missing), value=-1),
            "control_mode_scales": torch.nn.functional.pad(given["control_mode_scales"], (0, missing))}


def _row_chunks(places: list, rows_of, max_rows: int) -> list[list]:
    """`places` in order, cut into runs of at most `max_rows` rows (0: one run)."""
    chunks, rows = [[]], 0
    for place in places:
        count = rows_of(place)
        if max_rows and chunks[-1] and rows + count > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(place)
        rows += count
    return chunks


def cfg_end_fraction_from_parameters(parameters: dict[str, str]) -> float:
    """The scheduler's `cfg_end_fraction` config parameter: 1.0 (CFG on every step) unless set."""
    text = parameters.get("cfg_end_fraction", "1.0")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"model config parameter cfg_end_fraction={text!r}: expected a number from 0 to 1 "
                         "(1: CFG on every step; 0.5: CFG on the first half of the steps)")
    return value


def network_fn(unet: UNetFn, refiner: UNetFn | None, network: str) -> UNetFn:
    """The function that runs `network` (a Denoiser's): the UNet's, or the refiner's."""
    if network != REFINER_UNET.name:
        return unet
    if refiner is None:
        raise ValueError(f"a request reached its refiner steps, but no {REFINER_UNET.name} is given to run them")
    return refiner


def denoise(unet: UNetFn, denoiser: Denoiser, cancelled: Callable[[], bool] = lambda: False,
            refiner: UNetFn | None = None, controlnet: ControlNetFn | None = None) -> torch.Tensor:
    """Run the loop to the end; the final latents, for the vae_decoder. `cancelled` is asked before
    each step: the loop stops at the first step where it answers True. `refiner`: runs the refiner's
    steps (refiner_unet's inputs), for a denoiser with a refiner; `controlnet`: its ControlNets."""
    while not denoiser.done:
        if cancelled():
            raise Cancelled(f"cancelled before denoising step {denoiser.step_index + 1} of {len(denoiser.timesteps)}")
        inputs = controlled_unet_inputs([denoiser], controlnet)[0]
        denoiser.step(network_fn(unet, refiner, denoiser.network)(inputs))
    return denoiser.latents
