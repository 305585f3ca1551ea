"""Load the pipeline to export: base model, LoRAs fused into it, VAE. Every failure names its flag.

A source is a local directory or file, or a Hugging Face Hub id. Loading runs in fp32, LoRAs are
fused in fp32 (one rounding to the export dtype at the end), then the pipeline is cast.
PyTorch and diffusers are imported where they are used, so that `python -m export engines` runs
where only TensorRT and polygraphy are installed.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .progress import log, step

from contract.networks import SAFETY_IMAGE_SIZE
from contract.recipes import DEFAULT_PRESET, PREVIEW_VAE, PRESETS, Recipe

# The production set (the default preset, lcm-sdxl: SDXL + LCM-LoRA + fp16-fix VAE).
DEFAULT_MODEL = PRESETS[DEFAULT_PRESET].model
DEFAULT_LCM_LORA = PRESETS[DEFAULT_PRESET].loras[0].rpartition(":")[0]
DEFAULT_VAE = PRESETS[DEFAULT_PRESET].vae

DTYPES = ("fp16", "fp32")
PREVIEW_VAE_SUBFOLDER = "preview_vae"  # where `python -m export random` writes the preview decoder's AutoencoderTiny
# The safety checker diffusers' Stable Diffusion pipelines load (their feature_extractor is its
# preprocessor_config.json, in the same repository); `python -m export random` writes a random one
# of its architecture into the model directory's safety_checker/.
DEFAULT_SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"
SAFETY_CHECKER_SUBFOLDER = "safety_checker"
# Where `python -m export random` writes its SDXL-refiner-shaped UNet; a recipe with a refiner takes
# the model directory's refiner/ when --refiner is not given (export/cli.py).
REFINER_SUBFOLDER = "refiner"
# Where random pipelines keep their ControlNet (export tiny, export random): `--controlnet NAME=<model>/controlnet`.
CONTROLNET_SUBFOLDER = "controlnet"


class ExportError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class LoraSpec:
    source: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """`ID_OR_PATH[:WEIGHT]`; a colon always starts the weight, so paths cannot contain one."""
        source, sep, weight_text = text.rpartition(":") if ":" in text else (text, "", "")
        if not source.strip():
            raise ExportError(f"--lora {text!r}: no LoRA given; expected ID_OR_PATH[:WEIGHT], e.g. {DEFAULT_LCM_LORA}:1.0")
        if not sep:
            return cls(source)
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ExportError(
                f"--lora {text!r}: bad weight {weight_text!r}; expected a finite number after the last ':', "
                f"e.g. {source}:0.8"
            )
        return cls(source, weight)

    def __str__(self) -> str:
        return f"{self.source}:{self.weight:g}"


@dataclass(frozen=True)
class Sources:
    model: str
    loras: tuple[LoraSpec, ...] = ()
    vae: str | None = None  # None: the model's own VAE
    unet: str | None = None  # None: the model's own UNet; else a distilled one in its place
    preview_vae: str | None = None  # the preview decoder's AutoencoderTiny; None: see resolved_preview_vae
    safety_checker: str | None = None  # StableDiffusionSafetyChecker + its preprocessor; None: see resolved_safety_checker
    refiner: str | None = None  # the SDXL refiner (a pipeline directory or hub id: its unet/; or a UNet directory); None: none
    controlnets: tuple = ()  # contract.controlnets.ControlNetSource: each served as controlnet_NAME
    depth_estimator: str | None = None  # the depth preprocessor's model (export/depth.py); None: none
    ip_adapter: str | None = None  # an IP-Adapter file (export/ip_adapter.py), served with image_encoder; None: none
    image_encoder: str | None = None  # its CLIP image encoder

    @classmethod
    def from_recipe(cls, recipe: Recipe, preview_vae: str | None = None, safety_checker: str | None = None,
                    controlnets: tuple = (), depth_estimator: str | None = None, ip_adapter: str | None = None,
                    image_encoder: str | None = None) -> "Sources":
        return cls(recipe.model, tuple(LoraSpec.parse(lora) for lora in recipe.loras), recipe.vae, recipe.unet, preview_vae,
                   safety_checker, recipe.refiner, tuple(controlnets), depth_estimator, ip_adapter, image_encoder)

    def _own_or(self, given: str | None, subfolder: str, default: str) -> str:
        """The flag's value, else the model directory's `subfolder` (random pipelines have one), else `default`."""
        if given is not None:
            return given
        own = Path(self.model).expanduser() / subfolder
        return str(own) if own.is_dir() else default

    @property
    def resolved_safety_checker(self) -> str:
        """--safety-checker, else the model directory's safety_checker/, else CompVis's."""
        return self._own_or(self.safety_checker, SAFETY_CHECKER_SUBFOLDER, DEFAULT_SAFETY_CHECKER)

    @property
    def resolved_preview_vae(self) -> str:
        """--preview-vae, else the model directory's preview_vae/ (random pipelines have one), else TAESDXL."""
        return self._own_or(self.preview_vae, PREVIEW_VAE_SUBFOLDER, PREVIEW_VAE)

    def describe(self) -> dict:
        return {"model": self.model, "loras": [str(lora) for lora in self.loras], "vae": self.vae, "unet": self.unet,
                "preview_vae": self.resolved_preview_vae, "safety_checker": self.resolved_safety_checker, "refiner": self.refiner,
                **({"controlnets": {c.name: c.path for c in self.controlnets}} if self.controlnets else {}),
                **({"depth_estimator": self.depth_estimator} if self.depth_estimator else {}),
                **({"ip_adapter": self.ip_adapter, "image_encoder": self.image_encoder} if self.ip_adapter else {})}


@dataclass
class LoadedPipeline:
    pipe: object  # diffusers.StableDiffusionXLPipeline
    sources: Sources
    adapters: dict[str, list[str]] = field(default_factory=dict)


def hub_file(source: str) -> tuple[str, str] | None:
    """(repo id, file name) for HUB_ID/FILE.safetensors, a file inside a Hugging Face Hub repository
    (SDXL-Lightning's UNets, Hyper-SD's LoRAs); None for anything else, local paths included."""
    if Path(source).expanduser().exists() or source.startswith(("/", ".", "~")):
        return None
    parts = source.split("/")
    if len(parts) >= 3 and parts[-1].endswith(".safetensors") and all(parts):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return None


def _is_local(source: str) -> bool:
    return (Path(source).expanduser().exists() or source.startswith(("/", ".", "~"))
            or (source.count("/") > 1 and hub_file(source) is None))


def _load_error(flag: str, source: str, error: Exception) -> ExportError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if _is_local(source) and not Path(source).expanduser().exists():
        return ExportError(f"{flag} {source!r}: no such file or directory")
    if _is_local(source):
        return ExportError(f"{flag} {source!r}: cannot load it: {reason}")
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return ExportError(
        f"{flag} {source!r}: not a local directory, and the Hugging Face Hub could not provide it{offline}: "
        f"{reason}. Pass a local diffusers directory, or a hub id with the hub reachable (and HF_TOKEN for gated repos)."
    )


def load_vae(source: str):
    import torch
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    # A whole pipeline directory works too: take its vae/ subfolder.
    subfolder = "vae" if (path / "model_index.json").exists() else None
    try:
        return AutoencoderKL.from_pretrained(str(path) if path.exists() else source, subfolder=subfolder, dtype=torch.float32)
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error("--vae", source, error) from error


def load_preview_vae(source: str):
    """The preview decoder's AutoencoderTiny (TAESD-style): a directory, a pipeline directory (its
    preview_vae/), or a hub id."""
    import torch
    from diffusers import AutoencoderTiny

    path = Path(source).expanduser()
    subfolder = PREVIEW_VAE_SUBFOLDER if (path / "model_index.json").exists() else None
    try:  # diffusers warns that its own saved config key block_out_channels is unexpected: silenced
        with _diffusers_errors_only():
            return AutoencoderTiny.from_pretrained(str(path) if path.exists() else source, subfolder=subfolder, dtype=torch.float32)
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error("--preview-vae", source, error) from error


def load_safety_checker(source: str):
    """(StableDiffusionSafetyChecker, its CLIP image processor): a checker directory or hub id holding
    both (as CompVis's does), or a pipeline directory (its safety_checker/ and feature_extractor/)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessorPil

    path = Path(source).expanduser()
    pipeline = (path / "model_index.json").exists()
    location = str(path) if path.exists() else source
    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(
            location, dtype=torch.float32, **({"subfolder": SAFETY_CHECKER_SUBFOLDER} if pipeline else {}))
        # The PIL image processor (CLIP's own bicubic resize): what CLIPImageProcessor falls back to
        # without torchvision, and what the server runs.
        processor = CLIPImageProcessorPil.from_pretrained(location, **({"subfolder": "feature_extractor"} if pipeline else {}))
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error("--safety-checker", source, error) from error
    size = checker.config.vision_config.image_size
    crop = processor.crop_size["height"], processor.crop_size["width"]
    if size != SAFETY_IMAGE_SIZE or crop != (SAFETY_IMAGE_SIZE, SAFETY_IMAGE_SIZE):
        raise ExportError(f"--safety-checker {source!r}: images of {size} px and a {crop[0]}x{crop[1]} crop; the "
                          f"safety_checker network takes {SAFETY_IMAGE_SIZE}x{SAFETY_IMAGE_SIZE} (CLIP ViT-L/14's)")
    return checker, processor


def load_refiner(source: str, dims=None):
    """The SDXL refiner's UNet: a pipeline directory or hub id (its unet/), or a UNet directory. With
    `dims` (contract.networks.ModelDims of the base), checked to take the base's latents and its
    text_encoder_2 conditioning with aesthetic-score time ids, as SDXL's refiner does."""
    import torch
    from diffusers import UNet2DConditionModel

    path = Path(source).expanduser()
    location = str(path) if path.exists() else source
    subfolder = None if path.is_dir() and (path / "config.json").exists() else "unet"
    try:
        unet = UNet2DConditionModel.from_pretrained(location, subfolder=subfolder, torch_dtype=torch.float32)
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error("--refiner", source, error) from error
    if dims is not None:
        check_refiner(unet.config, dims, source)
    return unet


def check_refiner(config, dims, source: str) -> None:
    """ExportError unless the refiner UNet's config fits the base (`dims`) as SDXL's refiner does."""
    from contract.networks import REFINER_TIME_IDS_DIM

    time_dim = config.addition_time_embed_dim or 0
    wanted = {
        "in_channels": dims.latent_channels,
        "cross_attention_dim": dims.refiner_text_dim,
        "addition_embed_type": "text_time",
        "projection_class_embeddings_input_dim": REFINER_TIME_IDS_DIM * time_dim + dims.pooled_dim,
    }
    wrong = {key: getattr(config, key, None) for key, value in wanted.items() if getattr(config, key, None) != value}
    if wrong:
        found = ", ".join(f"{key} {value!r} (expected {wanted[key]!r})" for key, value in wrong.items())
        raise ExportError(f"--refiner {source!r}: not an SDXL refiner for this model: {found}; a refiner takes the base's "
                          f"latents, text_encoder_2's {dims.refiner_text_dim}-wide hidden states and {REFINER_TIME_IDS_DIM} time "
                          "ids with the aesthetic score (stabilityai/stable-diffusion-xl-refiner-1.0's unet/)")


UNION_CLASS = "ControlNetUnionModel"


def load_controlnet(source: str, dims=None, flag: str = "--controlnet"):
    """An SDXL ControlNet (diffusers' ControlNetModel, or ControlNetUnionModel where its config names that
    class: xinsir's controlnet-union-sdxl-1.0): a ControlNet directory or hub id, or a directory holding
    one in controlnet/. With `dims` (the base's contract.networks.ModelDims), checked to fit the base's
    UNet as an SDXL ControlNet does."""
    import torch
    from diffusers import ControlNetModel, ControlNetUnionModel

    path = Path(source).expanduser()
    location = str(path) if path.exists() else source
    subfolder = CONTROLNET_SUBFOLDER if path.is_dir() and not (path / "config.json").exists() else None
    try:
        config = ControlNetModel.load_config(location, subfolder=subfolder)
        kind = ControlNetUnionModel if config.get("_class_name") == UNION_CLASS else ControlNetModel
        controlnet = kind.from_pretrained(location, subfolder=subfolder, torch_dtype=torch.float32)
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error(flag, source, error) from error
    if dims is not None:
        check_controlnet(controlnet.config, dims, f"{flag} {source!r}")
    return controlnet


def check_controlnet(config, dims, what: str) -> None:
    """ExportError unless the ControlNet's config fits the base (`dims`): its latents, its text
    conditioning and time ids, and residuals of the base UNet's channels and sizes."""
    from contract.networks import TIME_IDS_DIM, unet_control_width

    time_dim = config.addition_time_embed_dim or 0
    found = {
        "in_channels": config.in_channels,
        "cross_attention_dim": config.cross_attention_dim,
        "addition_embed_type": config.addition_embed_type,
        "projection_class_embeddings_input_dim": config.projection_class_embeddings_input_dim,
        "residuals (control_width)": unet_control_width(config.block_out_channels, config.layers_per_block),
        "control image downsampling": 2 ** (len(config.conditioning_embedding_out_channels) - 1),
    }
    wanted = {
        "in_channels": dims.latent_channels,
        "cross_attention_dim": dims.text_dim,
        "addition_embed_type": "text_time",
        "projection_class_embeddings_input_dim": TIME_IDS_DIM * time_dim + dims.pooled_dim,
        "residuals (control_width)": dims.control_width,
        "control image downsampling": dims.vae_scale_factor,
    }
    wrong = [f"{key} {found[key]!r} (expected {value!r})" for key, value in wanted.items() if found[key] != value]
    if wrong:
        raise ExportError(f"{what}: not an SDXL ControlNet for this model: {', '.join(wrong)}; it must take this model's "
                          "latents, text embeddings and time ids and give residuals of its UNet's shapes "
                          "(for SDXL: diffusers/controlnet-canny-sdxl-1.0 and its kind)")


# The pipeline's networks; each export stage loads only the ones its graph needs (export/onnx_export.py).
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
# Beside them, not a part of StableDiffusionXLPipeline: the preview decoder's AutoencoderTiny, set on
# the loaded pipeline as `pipe.preview_vae`; the safety checker and its image processor, as
# `pipe.safety_checker` and `pipe.feature_extractor` (the names diffusers' SD pipelines give them).
PREVIEW_COMPONENT = "preview_vae"
SAFETY_COMPONENT = "safety_checker"
REFINER_COMPONENT = "refiner_unet"  # the refiner's UNet, as `pipe.refiner_unet`, when the sources have a refiner
SIDE_COMPONENTS = (PREVIEW_COMPONENT, SAFETY_COMPONENT, REFINER_COMPONENT)
ALL_COMPONENTS = (*COMPONENTS, *SIDE_COMPONENTS)
_LORA_TARGETS = ("unet", "text_encoder", "text_encoder_2")


def stored_dtype(source: str, components: tuple[str, ...]):
    """The dtype the components' weights are stored in (local safetensors), or None when unknown.

    Loading in that dtype lets the loader keep the tensors it read instead of converting them into
    a second copy: for a 5 GB fp16 UNet read as fp32, 15 GB at once instead of 10.
    """
    import torch
    from safetensors import safe_open

    found = set()
    for component in components:
        files = sorted(Path(source).expanduser().glob(f"{component}/*.safetensors"))
        if not files:
            return None
        with safe_open(files[0], "pt") as handle:
            keys = list(handle.keys())
            if keys:
                found.add(handle.get_slice(keys[0]).get_dtype())
    types = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    return types.get(found.pop()) if len(found) == 1 else None


def load_base(source: str, vae=None, components: tuple[str, ...] = COMPONENTS, dtype=None, in_memory: bool = False,
              unet=None):
    """The pipeline with `components` loaded (in `dtype`, default fp32) and the others None;
    tokenizers and scheduler always. `in_memory`: read the weight files instead of mapping them,
    for weights about to be cast (a mapped file stays resident until every tensor is converted)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    path = Path(source).expanduser()
    skipped = {name: None for name in COMPONENTS if name not in components}
    if "vae" in components and vae is not None:
        skipped["vae"] = vae
    if "unet" in components and unet is not None:
        skipped["unet"] = unet
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(path) if path.exists() else source, dtype=dtype or torch.float32, disable_mmap=in_memory, **skipped)
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error("--model", source, error) from error
    missing = [name for name in ("tokenizer", "tokenizer_2", *components) if getattr(pipe, name, None) is None]
    if missing:
        raise ExportError(f"--model {source!r}: not an SDXL pipeline: it has no {', '.join(missing)}")
    return pipe


def _split_lora_source(source: str) -> tuple[str, dict]:
    """load_lora_weights takes a directory or hub id, plus weight_name for one file."""
    path = Path(source).expanduser()
    if path.is_file():
        return str(path.parent), {"weight_name": path.name}
    if (in_hub := hub_file(source)) is not None:
        return in_hub[0], {"weight_name": in_hub[1]}
    return (str(path) if path.exists() else source), {}


def _adapter_names(pipe) -> dict[str, list[str]]:
    return {component: list(names) for component, names in pipe.get_list_adapters().items()}


_NO_MATCH = "none of its weights match a layer of this model's UNet or text encoders (a LoRA for another architecture, e.g. SD 1.5?)"


def _fit_error(lora: LoraSpec, error: Exception) -> ExportError:
    """Summarize PyTorch's list of shape mismatches: how many, and the first one."""
    text = " ".join(str(error).split())
    if "not found in the base model" in text:  # PEFT: none of the target modules exist here
        return ExportError(f"--lora {lora.source!r}: {_NO_MATCH}: {text[:300]}")
    shape = r"torch\.Size\((\[[^\]]*\])\)"
    mismatches = re.findall(rf"size mismatch for (\S+): copying a param with shape {shape} from checkpoint, "
                            rf"the shape in current model is {shape}", text)
    if mismatches:
        name, theirs, ours = mismatches[0]
        detail = (f"{len(mismatches)} of its weights have other shapes than this model's layers, e.g. {name}: "
                  f"LoRA {theirs}, model {ours} (a LoRA for another model size or architecture?)")
    else:
        detail = text[:400]
    return ExportError(f"--lora {lora.source!r}: does not fit this model's UNet/text encoders: {detail}")


def _read_lora(pipe, lora: LoraSpec, unet_config) -> tuple[dict, dict | None, dict | None]:
    """(state dict, network alphas, metadata) as `load_lora_weights` reads them, in diffusers' keys."""
    location, kwargs = _split_lora_source(lora.source)
    if _is_local(lora.source) and not Path(lora.source).expanduser().exists():
        raise ExportError(f"--lora {lora.source!r}: no such file or directory")
    try:  # A source problem (missing, no hub) is told apart from a fit problem (below).
        state, alphas, metadata = pipe.lora_state_dict(location, unet_config=unet_config, return_lora_metadata=True, **kwargs)
    except Exception as error:
        raise _load_error("--lora", lora.source, error) from error
    if not state or not all("lora" in key for key in state):
        raise ExportError(f"--lora {lora.source!r}: not a LoRA checkpoint (every weight name must contain 'lora')")
    return state, alphas, metadata


def _load_lora(pipe, lora: LoraSpec, name: str, unet_config) -> None:
    """What `load_lora_weights` does, for the components this pipeline has loaded: an export stage
    holds only the networks of one graph (the UNet's LoRA part, or the text encoders')."""
    state, alphas, metadata = _read_lora(pipe, lora, unet_config)
    targeted = [c for c in _LORA_TARGETS if any(key.startswith(f"{c}.") for key in state)]
    present = [c for c in targeted if getattr(pipe, c, None) is not None]
    try:
        with _diffusers_errors_only(on=False):
            if "unet" in present:
                pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, adapter_name=name,
                                         metadata=metadata, _pipeline=pipe)
            for component in ("text_encoder", "text_encoder_2"):
                if component in present:
                    pipe.load_lora_into_text_encoder(
                        state, network_alphas=alphas, text_encoder=getattr(pipe, component), prefix=component,
                        lora_scale=pipe.lora_scale, adapter_name=name, metadata=metadata, _pipeline=pipe,
                    )
    except Exception as error:
        raise _fit_error(lora, error) from error
    loaded = [c for c, names in _adapter_names(pipe).items() if name in names]
    if not targeted or (present and not loaded):
        raise ExportError(f"--lora {lora.source!r}: {_NO_MATCH}")


def apply_loras(pipe, loras: tuple[LoraSpec, ...], unet_config) -> dict[str, list[str]]:
    """Load each LoRA as its own adapter into the loaded components, weight them with set_adapters,
    fuse them (in the pipeline's dtype: fp32), and unload the PEFT layers."""
    if not loras:
        return {}
    names = [f"lora_{index}" for index in range(len(loras))]
    for lora, name in zip(loras, names):
        with step(f"loading LoRA {lora}"):
            _load_lora(pipe, lora, name, unet_config)
    adapters = _adapter_names(pipe)
    present = [name for name in names if any(name in found for found in adapters.values())]
    if not present:  # none of the LoRAs has weights for this stage's networks
        return adapters
    weights = [lora.weight for lora, name in zip(loras, names) if name in present]
    with step("fusing LoRAs " + ", ".join(str(lora) for lora, name in zip(loras, names) if name in present)):
        pipe.set_adapters(present, adapter_weights=weights)
        pipe.fuse_lora(components=list(adapters), lora_scale=1.0, adapter_names=present)
        pipe.unload_lora_weights()
    leftover = [n for c in _LORA_TARGETS if getattr(pipe, c, None) is not None
                for n, m in getattr(pipe, c).named_modules() if _is_peft_layer(m)]
    if leftover:
        raise ExportError(f"internal: LoRA layers left after fusing: {leftover[:5]}")
    return adapters


def _is_peft_layer(module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: no LoRA layer can exist
        return False
    return isinstance(module, BaseTunerLayer)


def _unet_config(source: str):
    """The UNet's config alone (no weights): what reading a LoRA in another format needs."""
    from diffusers import UNet2DConditionModel

    path = Path(source).expanduser()
    try:
        return UNet2DConditionModel.load_config(str(path) if path.exists() else source, subfolder="unet")
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error("--model", source, error) from error


def load_unet(source: str, model: str, dtype=None):
    """A UNet that replaces the model's: a diffusers UNet directory (or a pipeline directory: its
    unet/), a .safetensors state dict for the model's UNet config (local, or HUB_ID/FILE.safetensors
    as SDXL-Lightning publishes them), or a hub id of a diffusers UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    dtype = dtype or torch.float32
    path = Path(source).expanduser()
    if _is_local(source) and not path.exists():
        raise ExportError(f"--unet {source!r}: no such file or directory")
    try:
        if path.is_dir():
            subfolder = "unet" if (path / "model_index.json").exists() else None
            return UNet2DConditionModel.from_pretrained(str(path), subfolder=subfolder, torch_dtype=dtype)
        if path.is_file() or hub_file(source) is not None:
            from safetensors.torch import load_file

            if path.is_file():
                weights = str(path)
            else:
                from huggingface_hub import hf_hub_download

                weights = hf_hub_download(*hub_file(source))
            unet = UNet2DConditionModel.from_config(_unet_config(model))
            state = load_file(weights)
        else:
            return UNet2DConditionModel.from_pretrained(source, torch_dtype=dtype)
    except ExportError:
        raise
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error("--unet", source, error) from error
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ExportError(f"--unet {source!r}: its weights do not fit the UNet of --model {model!r}: {detail}") from None
    return unet.to(dtype)


def model_dims(sources: Sources, pipe=None):
    """The dims of the graphs (contract.networks.ModelDims) from the components' configs, without
    their weights; `pipe`: a pipeline already loaded with its tokenizers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from contract.networks import ModelDims, lora_widths

    model = str(Path(sources.model).expanduser()) if Path(sources.model).expanduser().exists() else sources.model
    try:
        tokenizer = pipe.tokenizer if pipe is not None else load_base(sources.model, components=()).tokenizer
        text_encoder = CLIPTextConfig.from_pretrained(model, subfolder="text_encoder")
        text_encoder_2 = CLIPTextConfig.from_pretrained(model, subfolder="text_encoder_2")
        unet = UNet2DConditionModel.load_config(model, subfolder="unet")
        if sources.unet is not None and Path(sources.unet).expanduser().is_dir():
            path = Path(sources.unet).expanduser()
            unet = UNet2DConditionModel.load_config(str(path), subfolder="unet" if (path / "model_index.json").exists() else None)
    except ExportError:
        raise
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error("--model", sources.model, error) from error
    if sources.vae is not None:
        path = Path(sources.vae).expanduser()
        subfolder = "vae" if (path / "model_index.json").exists() else None
        try:
            vae = AutoencoderKL.load_config(str(path) if path.exists() else sources.vae, subfolder=subfolder)
        except Exception as error:
            raise _load_error("--vae", sources.vae, error) from error
    else:
        vae = AutoencoderKL.load_config(model, subfolder="vae")
    from contract.ip_adapters import ip_layer_names

    components = meta_components(text_encoder, text_encoder_2, unet)
    return ModelDims.from_configs(tokenizer.model_max_length, text_encoder, text_encoder_2, unet, vae,
                                  lora_widths=lora_widths(components),
                                  ip_dims={"ip_layers": len(ip_layer_names(components.unet.attn_processors))})


def meta_components(text_encoder_config, text_encoder_2_config, unet_config):
    """The UNet and both text encoders built on the meta device from their configs: every module
    and shape, no memory; what the LoRA site tables are read from without the weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from types import SimpleNamespace

    with torch.device("meta"):
        return SimpleNamespace(unet=UNet2DConditionModel.from_config(unet_config),
                               text_encoder=CLIPTextModel(text_encoder_config),
                               text_encoder_2=CLIPTextModelWithProjection(text_encoder_2_config))


def load_pipeline(sources: Sources, dtype: str = "fp32", device: str = "cpu", components: tuple[str, ...] | None = None) -> LoadedPipeline:
    """The pipeline to export, with `components` loaded (the others None), LoRAs fused, on `device`, in `dtype`.

    Memory: the networks are read in the dtype they are stored in (no converted second copy), then
    cast where they lie, parameter by parameter: to fp32 when there are LoRAs to fuse (one rounding
    of weight + LoRA delta, as diffusers computes it in fp32), then to `dtype`. So a stage holds one
    fp32 copy of its networks at most (the SDXL UNet: 10.3 GB), one fp16 copy for an fp16 export
    without LoRAs.
    """
    import torch

    check_device(device)
    if components is None:  # every one the sources have
        components = tuple(c for c in ALL_COMPONENTS if c != REFINER_COMPONENT or sources.refiner is not None)
    unknown = set(components) - set(ALL_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; known: {', '.join(ALL_COMPONENTS)}")
    wants_preview, wants_checker = PREVIEW_COMPONENT in components, SAFETY_COMPONENT in components
    wants_refiner = REFINER_COMPONENT in components
    if wants_refiner and sources.refiner is None:
        raise ValueError("the refiner_unet component needs sources with a refiner (Sources.refiner)")
    components = tuple(c for c in components if c not in SIDE_COMPONENTS)
    vae = None
    if sources.vae is not None and "vae" in components:
        with step(f"loading VAE {sources.vae}"):
            vae = load_vae(sources.vae)
    what = ("all components" if set(components) == set(COMPONENTS) else ", ".join(components) or "tokenizers and scheduler") + (
        " + preview VAE" if wants_preview else "") + (" + safety checker" if wants_checker else "") + (
        " + refiner" if wants_refiner else "")
    unet = None
    if sources.unet is not None and "unet" in components:
        with step(f"loading UNet {sources.unet} (in place of the model's)"):
            unet = load_unet(sources.unet, sources.model)
    model_components = tuple(c for c in components if not (c == "vae" and vae is not None) and not (c == "unet" and unet is not None))
    read_dtype = stored_dtype(sources.model, model_components) if model_components else None
    upcast = bool(sources.loras) or dtype == "fp32"
    in_memory = upcast and read_dtype in (torch.float16, torch.bfloat16)
    with step(f"loading SDXL pipeline {sources.model} ({what})"):
        pipe = load_base(sources.model, vae, components, dtype=read_dtype, in_memory=in_memory, unet=unet)
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    if sources.loras:  # fused in fp32
        with _diffusers_errors_only():
            for name in _LORA_TARGETS:
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).to(torch.float32)
    loras = sources.loras if any(name in _LORA_TARGETS for name in components) else ()
    unet_config = pipe.unet.config if pipe.unet is not None else (_unet_config(sources.model) if loras else None)
    adapters = apply_loras(pipe, loras, unet_config)
    if wants_preview:  # after the model: its errors come first
        with step(f"loading preview VAE {sources.resolved_preview_vae}"):
            pipe.preview_vae = load_preview_vae(sources.resolved_preview_vae)  # an attribute the export reads
        components = (*components, PREVIEW_COMPONENT)
    if wants_checker:
        with step(f"loading safety checker {sources.resolved_safety_checker}"):
            pipe.safety_checker, pipe.feature_extractor = load_safety_checker(sources.resolved_safety_checker)
        components = (*components, SAFETY_COMPONENT)
    if wants_refiner:
        with step(f"loading refiner {sources.refiner}"):
            pipe.refiner_unet = load_refiner(sources.refiner, model_dims(sources, pipe))
        components = (*components, REFINER_COMPONENT)
    with _diffusers_errors_only():  # its warnings on casting to fp16 on a CPU are for running, not exporting
        for name in components:
            getattr(pipe, name).to(device=device, dtype=torch_dtype)
    if dtype == "fp16" and pipe.vae is not None and getattr(pipe.vae.config, "force_upcast", False):
        # This VAE overflows in fp16 (the original SDXL VAE does); diffusers upcasts it, and so do we.
        pipe.vae.to(torch.float32)
        log("VAE config says force_upcast: the VAE decoder stays fp32 (use the fp16-fix VAE to avoid it)")
    log(f"pipeline ready: {what}, {dtype} on {device}")
    return LoadedPipeline(pipe, sources, adapters)


@contextmanager
def _diffusers_errors_only(on: bool = True):
    """Silence diffusers' warnings (`on=False`: its error logs too, for errors we report ourselves)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error() if on else logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def check_writable(repository: Path, flag: str = "--out") -> None:
    """Fail before hours of loading, not after, when the output cannot be written."""
    try:
        Path(repository).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=repository, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ExportError(f"{flag} {str(repository)!r}: cannot write there ({error.strerror or error}); choose a writable directory") from error


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device is visible to PyTorch here; use --device cpu")
