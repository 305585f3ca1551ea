"""The recipes (few-step ones, and SDXL's standard one): which model, LoRAs, UNet and VAE an export takes, which diffusers scheduler
the denoising loop runs, and what a request may and by default does ask of it.

Shared by `export` (it resolves `--preset` / `--scheduler` and writes the recipe into the repository)
and `serving` (the scheduler model runs the scheduler class the export wrote and checks requests
against the recipe's step range). Pure data: no diffusers import here.

Sources of the recipes: each model card (settings as the card's diffusers example uses them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class SchedulerKind:
    """A diffusers scheduler class and the config it is built with from the pipeline's own
    scheduler config (`cls.from_config(pipeline_scheduler_config, **overrides)`). No class: the
    pipeline's own scheduler, class and config as its scheduler_config.json has them."""

    class_name: str | None
    overrides: dict = field(default_factory=dict)
    # The keyword of `step` that the pipeline passes from its `eta` argument (DDIM, TCD).
    takes_eta: bool = False


TRAILING = {"timestep_spacing": "trailing"}
SCHEDULERS = {
    "lcm": SchedulerKind("LCMScheduler"),
    "euler-ancestral": SchedulerKind("EulerAncestralDiscreteScheduler", TRAILING),  # SDXL-Turbo's card
    "euler": SchedulerKind("EulerDiscreteScheduler", TRAILING),  # SDXL-Lightning's card
    "tcd": SchedulerKind("TCDScheduler", TRAILING, takes_eta=True),  # TCD's card, with its eta (gamma)
    "ddim": SchedulerKind("DDIMScheduler", TRAILING, takes_eta=True),  # Hyper-SD's card
    # The model's own: SDXL base 1.0's scheduler_config.json is an EulerDiscreteScheduler with
    # "leading" spacing, what its model card's diffusers example runs (and most fine-tunes ship).
    "model": SchedulerKind(None),
}
SCHEDULER_CLASSES = {kind.class_name: name for name, kind in SCHEDULERS.items() if kind.class_name}


def scheduler_kind(class_name: str) -> str:
    """The --scheduler name of a diffusers class name; ValueError naming the supported ones."""
    if class_name not in SCHEDULER_CLASSES:
        supported = ", ".join(f"{c} ({n})" for c, n in SCHEDULER_CLASSES.items())
        raise ValueError(f"scheduler class {class_name!r} is not one the denoising loop runs; supported: {supported}")
    return SCHEDULER_CLASSES[class_name]


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
# Where the base hands the schedule over to the refiner: diffusers' expert-ensemble example and
# Replicate's SDXL API (`high_noise_frac`, expert_ensemble_refiner) both default to 0.8.
DEFAULT_HIGH_NOISE_FRAC = 0.8
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
# The streaming endpoint's preview decoder (TAESD for SDXL's latent space, which every preset shares).
# An export takes `--preview-vae`, else the model directory's preview_vae/ (the random pipelines of
# `python -m export random` have one), else this.
PREVIEW_VAE = "madebyollin/taesdxl"


@dataclass(frozen=True)
class Recipe:
    """One way to get images in a few steps. `loras`: ID_OR_PATH[:WEIGHT]; `unet`: a distilled UNet
    that replaces the model's (a diffusers directory, a .safetensors file, or HUB_ID/FILE.safetensors)."""

    name: str
    model: str
    scheduler: str  # a key of SCHEDULERS
    loras: tuple[str, ...] = ()
    unet: str | None = None
    vae: str | None = None  # None: the model's own
    min_steps: int = 1
    max_steps: int = 8
    default_steps: int = 4
    default_guidance: float = 1.0  # <= 1: no CFG
    eta: float | None = None  # the stochastic steps' eta (TCD's gamma); None: the scheduler's own default
    size: int = 1024  # the resolution the recipe was trained for (height and width)
    licence: str = ""
    # The SDXL refiner (a pipeline directory or hub id: its unet/) that runs the last part of the
    # schedule, and the default fraction the base runs before it (a request's high_noise_frac).
    refiner: str | None = None
    high_noise_frac: float | None = None

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"recipe {self.name}: eta {self.eta:g}: expected a number from 0 to 1")
        if (self.refiner is None) != (self.high_noise_frac is None):
            raise ValueError(f"recipe {self.name}: a refiner and its high_noise_frac go together (refiner "
                             f"{self.refiner!r}, high_noise_frac {self.high_noise_frac!r})")
        if self.high_noise_frac is not None and not 0.0 < self.high_noise_frac <= 1.0:
            raise ValueError(f"recipe {self.name}: high_noise_frac {self.high_noise_frac:g}: expected a number in (0, 1]")
        if not 1 <= self.min_steps <= self.default_steps <= self.max_steps:
            raise ValueError(f"recipe {self.name}: steps must satisfy 1 <= min {self.min_steps} <= default "
                             f"{self.default_steps} <= max {self.max_steps}")

    def as_parameters(self) -> dict[str, str]:
        """The scheduler model's config parameters that carry this recipe (string values)."""
        parameters = {
            "recipe": self.name,
            "recipe_model": self.model,
            "recipe_loras": ",".join(self.loras),
            "recipe_unet": self.unet or "",
            "recipe_vae": self.vae or "",
            # The model's own scheduler: its class is known once the export has read the model
            # (contract/configs.follow_recipe fills it in from the scheduler config it wrote).
            "recipe_scheduler": SCHEDULERS[self.scheduler].class_name or "",
            "min_steps": str(self.min_steps),
            "max_steps": str(self.max_steps),
            "default_steps": str(self.default_steps),
            "default_guidance": f"{self.default_guidance:g}",
            "eta": "" if self.eta is None else f"{self.eta:g}",
            "recommended_size": str(self.size),
            # Empty: no refiner (the loop refuses a request's high_noise_frac).
            "recipe_refiner": self.refiner or "",
            "high_noise_frac": "" if self.high_noise_frac is None else f"{self.high_noise_frac:g}",
        }
        return parameters

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        data = json.loads(text)
        data["loras"] = tuple(data.get("loras") or ())
        return cls(**data)


RECIPE_PARAMETERS = tuple(Recipe("x", "m", "lcm").as_parameters())  # the keys, in order

PRESETS = {
    recipe.name: recipe
    for recipe in (
        Recipe("lcm-sdxl", SDXL_BASE, "lcm", loras=("latent-consistency/lcm-lora-sdxl:1.0",), vae=FP16_FIX_VAE,
               min_steps=1, max_steps=8, default_steps=4, default_guidance=1.0, size=1024,
               licence="CreativeML Open RAIL++-M (SDXL base 1.0, LCM-LoRA SDXL)"),
        Recipe("sdxl-turbo", "stabilityai/sdxl-turbo", "euler-ancestral", vae=FP16_FIX_VAE,
               min_steps=1, max_steps=4, default_steps=1, default_guidance=0.0, size=512,
               licence="Stability AI non-commercial research community licence (commercial use needs Stability AI's licence)"),
        Recipe("sdxl-lightning-4step", SDXL_BASE, "euler", unet="ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors",
               vae=FP16_FIX_VAE, min_steps=4, max_steps=4, default_steps=4, default_guidance=0.0, size=1024,
               licence="CreativeML Open RAIL++-M (SDXL base 1.0, SDXL-Lightning)"),
        Recipe("ssd-1b-lcm", "segmind/SSD-1B", "lcm", loras=("latent-consistency/lcm-lora-ssd-1b:1.0",), vae=FP16_FIX_VAE,
               min_steps=1, max_steps=8, default_steps=4, default_guidance=1.0, size=1024,
               licence="Apache 2.0 (SSD-1B); CreativeML Open RAIL++-M (LCM-LoRA SSD-1B)"),
        Recipe("tcd-sdxl", SDXL_BASE, "tcd", loras=("h1t/TCD-SDXL-LoRA:1.0",), vae=FP16_FIX_VAE,
               min_steps=1, max_steps=8, default_steps=4, default_guidance=0.0, eta=0.3, size=1024,
               licence="CreativeML Open RAIL++-M (SDXL base 1.0); TCD-SDXL-LoRA: see its model card"),
        Recipe("hyper-sdxl-4step", SDXL_BASE, "ddim", loras=("ByteDance/Hyper-SD/Hyper-SDXL-4steps-lora.safetensors:1.0",),
               vae=FP16_FIX_VAE, min_steps=1, max_steps=8, default_steps=4, default_guidance=0.0, size=1024,
               licence="CreativeML Open RAIL++-M (SDXL base 1.0); Hyper-SD: see its model card"),
        # The standard recipe, not a few-step one: the model's own scheduler (SDXL base 1.0: Euler,
        # leading spacing), 20 steps of 1 to 50, guidance 5.0 (the base model card's example: 20 to
        # 50 steps; fine-tunes are mostly run with 20 to 30 and CFG 5 to 7).
        Recipe("sdxl-base", SDXL_BASE, "model", vae=FP16_FIX_VAE, min_steps=1, max_steps=50, default_steps=20,
               default_guidance=5.0, size=1024, licence="CreativeML Open RAIL++-M (SDXL base 1.0)"),
        # The same with SDXL's refiner for the last 20% of the schedule (the base model card's "ensemble
        # of experts" and its diffusers example: denoising_end / denoising_start 0.8).
        Recipe("sdxl-base-refiner", SDXL_BASE, "model", vae=FP16_FIX_VAE, min_steps=1, max_steps=50, default_steps=20,
               default_guidance=5.0, size=1024, refiner=SDXL_REFINER, high_noise_frac=DEFAULT_HIGH_NOISE_FRAC,
               licence="CreativeML Open RAIL++-M (SDXL base 1.0, SDXL refiner 1.0)"),
    )
}
DEFAULT_PRESET = "lcm-sdxl"

# A recipe named by --scheduler alone (with --model): the step range the served endpoint had before
# recipes, no CFG by default, the scheduler's own eta.
CUSTOM = "custom"


def custom_recipe(model: str, scheduler: str, loras: tuple[str, ...] = (), unet: str | None = None,
                  vae: str | None = None) -> Recipe:
    return Recipe(CUSTOM, model, scheduler, loras=loras, unet=unet, vae=vae)


def resolve(preset: str | None, *, model: str | None = None, loras: tuple[str, ...] | None = None,
            unet: str | None = None, vae: str | None = None, scheduler: str | None = None,
            eta: float | None = None, refiner: str | None = None) -> Recipe:
    """The recipe of `--preset` with the flags given beside it overriding it. Without a preset:
    without --model, the default preset (with any --lora added after its LoRAs); with --model, a
    custom recipe of exactly the flags given (scheduler default lcm). `refiner`: a refiner in place
    of the preset's, or added (hand-off at DEFAULT_HIGH_NOISE_FRAC)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if preset is None and model is not None:
        recipe = with_refiner(custom_recipe(model, scheduler or "lcm", tuple(loras or ()), unet, vae), refiner)
        return recipe if eta is None else replace(recipe, eta=eta)
    base = PRESETS[preset or DEFAULT_PRESET]
    changes: dict = {}
    if model is not None:
        changes["model"] = model
    if loras:
        changes["loras"] = tuple(loras) if preset is not None else (*base.loras, *loras)
    if unet is not None:
        changes["unet"] = unet
    if vae is not None:
        changes["vae"] = vae
    if scheduler is not None:
        changes["scheduler"] = scheduler
    if eta is not None:
        changes["eta"] = eta
    return with_refiner(replace(base, **changes) if changes else base, refiner)


def with_refiner(recipe: Recipe, refiner: str | None) -> Recipe:
    """`recipe` with `refiner` in place of its own (None: as it is), handing off where it did, else at
    DEFAULT_HIGH_NOISE_FRAC."""
    if refiner is None:
        return recipe
    return replace(recipe, refiner=refiner, high_noise_frac=recipe.high_noise_frac or DEFAULT_HIGH_NOISE_FRAC)


def read_recipe(path: Path) -> Recipe | None:
    path = Path(path)
    return Recipe.from_json(path.read_text()) if path.exists() else None
