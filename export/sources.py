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

# The production set (issue: SDXL + LCM-LoRA + fp16-fix VAE).
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_LCM_LORA = "latent-consistency/lcm-lora-sdxl"
DEFAULT_VAE = "madebyollin/sdxl-vae-fp16-fix"

DTYPES = ("fp16", "fp32")


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

    @classmethod
    def resolve(cls, model: str | None, loras: list[LoraSpec], vae: str | None) -> "Sources":
        """No --model: the production set, with any --lora added after the LCM-LoRA."""
        if model is None:
            return cls(DEFAULT_MODEL, (LoraSpec(DEFAULT_LCM_LORA, 1.0), *loras), vae or DEFAULT_VAE)
        return cls(model, tuple(loras), vae)

    def describe(self) -> dict:
        return {"model": self.model, "loras": [str(lora) for lora in self.loras], "vae": self.vae}


@dataclass
class LoadedPipeline:
    pipe: object  # diffusers.StableDiffusionXLPipeline
    sources: Sources
    adapters: dict[str, list[str]] = field(default_factory=dict)


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1


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


def load_base(source: str, vae=None):
    import torch
    from diffusers import StableDiffusionXLPipeline

    path = Path(source).expanduser()
    extra = {"vae": vae} if vae is not None else {}
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(path) if path.exists() else source, dtype=torch.float32, **extra
        )
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error("--model", source, error) from error
    missing = [name for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae") if getattr(pipe, name, None) is None]
    if missing:
        raise ExportError(f"--model {source!r}: not an SDXL pipeline: it has no {', '.join(missing)}")
    return pipe


def _split_lora_source(source: str) -> tuple[str, dict]:
    """load_lora_weights takes a directory or hub id, plus weight_name for one file."""
    path = Path(source).expanduser()
    if path.is_file():
        return str(path.parent), {"weight_name": path.name}
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


def _load_lora(pipe, lora: LoraSpec, name: str) -> None:
    location, kwargs = _split_lora_source(lora.source)
    if _is_local(lora.source) and not Path(lora.source).expanduser().exists():
        raise ExportError(f"--lora {lora.source!r}: no such file or directory")
    try:  # Reading first tells a source problem (missing, no hub) from a fit problem below.
        pipe.lora_state_dict(location, **kwargs)
    except Exception as error:
        raise _load_error("--lora", lora.source, error) from error
    try:
        with _diffusers_errors_only(on=False):
            pipe.load_lora_weights(location, adapter_name=name, **kwargs)
    except Exception as error:
        raise _fit_error(lora, error) from error
    if not any(name in adapters for adapters in _adapter_names(pipe).values()):
        raise ExportError(f"--lora {lora.source!r}: {_NO_MATCH}")


def apply_loras(pipe, loras: tuple[LoraSpec, ...]) -> dict[str, list[str]]:
    """Load each LoRA as its own adapter, weight them with set_adapters, fuse, and unload PEFT layers."""
    if not loras:
        return {}
    names = [f"lora_{index}" for index in range(len(loras))]
    for lora, name in zip(loras, names):
        with step(f"loading LoRA {lora}"):
            _load_lora(pipe, lora, name)
    adapters = _adapter_names(pipe)
    with step("fusing LoRAs " + ", ".join(str(lora) for lora in loras)):
        pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])
        pipe.fuse_lora(components=list(adapters), lora_scale=1.0, adapter_names=names)
        pipe.unload_lora_weights()
    leftover = [n for c in ("unet", "text_encoder", "text_encoder_2") for n, m in getattr(pipe, c).named_modules() if _is_peft_layer(m)]
    if leftover:
        raise ExportError(f"internal: LoRA layers left after fusing: {leftover[:5]}")
    return adapters


def _is_peft_layer(module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: no LoRA layer can exist
        return False
    return isinstance(module, BaseTunerLayer)


def load_pipeline(sources: Sources, dtype: str = "fp32", device: str = "cpu") -> LoadedPipeline:
    """The pipeline to export, LoRAs fused, on `device`, in `dtype`."""
    import torch

    check_device(device)
    vae = None
    if sources.vae is not None:
        with step(f"loading VAE {sources.vae}"):
            vae = load_vae(sources.vae)
    with step(f"loading SDXL pipeline {sources.model}"):
        pipe = load_base(sources.model, vae)
    adapters = apply_loras(pipe, sources.loras)
    with _diffusers_errors_only():  # its warnings on casting to fp16 on a CPU are for running, not exporting
        pipe.to(device=device, dtype=getattr(torch, {'fp16': 'float16', 'fp32': 'float32'}[dtype]))
    if dtype == "fp16" and getattr(pipe.vae.config, "force_upcast", False):
        # This VAE overflows in fp16 (the original SDXL VAE does); diffusers upcasts it, and so do we.
        pipe.vae.to(torch.float32)
        log("VAE config says force_upcast: the VAE decoder stays fp32 (use the fp16-fix VAE to avoid it)")
    log(f"pipeline ready: {dtype} on {device}")
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
