"""IP-Adapter image prompts in the loops (docs/ip-adapter.md), as StableDiffusionXLPipeline runs them after
`load_ip_adapter` and `set_ip_adapter_scale`:

1. `check_image_prompt`: the request's ip_adapter_image, ip_adapter_scale and ip_adapter_layers, checked
   before any work (INVALID_ARG naming the input).
2. `ServedIPAdapter.pixel_values`: the image preprocessed as the CLIPImageProcessor diffusers' loader
   registers (preprocessor_config.json beside the encoder's graph; serving/safety.py ClipPreprocessor,
   bit-exact to transformers' PIL path, without importing transformers).
3. The `image_encoder` graph (BLS, once per request): the image's tokens and CFG's negative tokens,
   diffusers' (the projection of zeros for the plain adapter, of a zero image's encoding for Plus).
4. `ImagePrompt.rows`: what unet_ip takes per UNet row, negative rows first with CFG as the pipeline
   concatenates them, each image of the request the same tokens; the scale per IP layer is the request's
   scale times its layer setting's mask (the export resolved the settings against its UNet).
A scale of 0 is no image prompt at all: the request runs the graphs it would run without one (diffusers
skips a layer whose scale is 0, which adds exactly what no adapter adds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from contract import layout
from contract.ip_adapters import ALL, DEFAULT_SCALE, LAYER_SETTINGS, check_scale, layer_scales
from contract.limits import Limits
from contract.networks import IMAGE_ENCODER

from .endpoint import IP_ADAPTER_INPUT_NAMES, InvalidInput, _one
from .safety import ClipPreprocessor


@dataclass(frozen=True)
class ServedIPAdapter:
    """The IP-Adapter a repository serves, as its export recorded it beside the image encoder's graph."""

    kind: str
    tokens: int
    layer_settings: dict  # {setting: mask per IP layer}, the settings this UNet serves
    preprocessor: ClipPreprocessor

    @classmethod
    def load(cls, repository) -> "ServedIPAdapter | None":
        """None where the repository has no image encoder (no IP-Adapter exported)."""
        directory = layout.version_dir(Path(repository), IMAGE_ENCODER.name)
        described = directory / layout.IP_ADAPTER_FILE
        if not (directory / layout.ONNX_FILE).exists() and not (directory / layout.ENGINE_FILE).exists():
            return None
        if not described.exists():
            raise ValueError(f"{described}: missing; the export writes it beside the image encoder's graph "
                             "(python -m export onnx --ip-adapter FILE --image-encoder DIR)")
        info = json.loads(described.read_text())
        config_path = directory / layout.IP_PREPROCESSOR_FILE
        preprocessor = ClipPreprocessor(json.loads(config_path.read_text()), str(config_path))
        return cls(info["kind"], int(info["tokens"]), dict(info["layer_settings"]), preprocessor)

    def pixel_values(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] -> the encoder's fp32 [1, 3, 224, 224]."""
        return self.preprocessor(np.ascontiguousarray(image))[None]


@dataclass(frozen=True)
class ImagePromptSpec:
    """A request's image prompt, checked: its scale and its layer setting (its image stays in the request)."""

    scale: float
    layers: str = ALL


def check_image_prompt(raw: Mapping[str, np.ndarray | None], limits: Limits, served: ServedIPAdapter | None) -> ImagePromptSpec | None:
    """The request's image prompt; None without one. InvalidInput naming the input for a bad one."""
    get = raw.get
    image = get("ip_adapter_image")
    if image is None:
        sent = [name for name in IP_ADAPTER_INPUT_NAMES[1:] if get(name) is not None]
        if sent:
            raise InvalidInput(sent[0], _one(sent[0], get(sent[0])), "no ip_adapter_scale or ip_adapter_layers without an "
                               "ip_adapter_image (the image prompt they go with)")
        return None
    image = np.asarray(image)
    if served is None:
        raise InvalidInput("ip_adapter_image", f"<{image.dtype} {list(image.shape)}>",
                           "no image prompt: this deployment serves no IP-Adapter (python -m export onnx --ip-adapter FILE "
                           "--image-encoder DIR serves one)")
    accepted = f"an RGB image, UINT8 [H, W, 3], H and W each from 1 to {limits.max_size} (any size; CLIP's preprocessing runs here)"
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or not all(1 <= side <= limits.max_size for side in image.shape[:2]):
        raise InvalidInput("ip_adapter_image", f"<{image.dtype} {list(image.shape)}>", accepted)
    scale = _one("ip_adapter_scale", get("ip_adapter_scale"))
    scale = DEFAULT_SCALE if scale is None else float(f"{float(scale):.7g}")  # FP32 as sent
    try:
        scale = check_scale(scale)
    except ValueError as error:
        raise InvalidInput("ip_adapter_scale", scale, str(error)) from None
    return ImagePromptSpec(scale, _layer_setting(get("ip_adapter_layers"), served))


def _layer_setting(array, served: ServedIPAdapter) -> str:
    value = _one("ip_adapter_layers", array)
    if value is None:
        return ALL
    text = bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, np.bytes_)) else value
    if text in served.layer_settings:
        return text
    unserved = [name for name in LAYER_SETTINGS if name not in served.layer_settings]
    note = f" ({', '.join(unserved)}: not in this UNet's layers)" if unserved else ""
    raise InvalidInput("ip_adapter_layers", text if isinstance(text, str) else repr(text)[:60],
                       f"one of {', '.join(served.layer_settings)}{note}")


@dataclass(frozen=True)
class ImagePrompt:
    """A request's image prompt in its loop: its tokens and CFG's negative tokens ([1, tokens, dim], the
    loop's device and the graphs' dtype), its scale per IP layer ([ip_layers], fp32), and the UNet's input
    widths for the zeros unet_ip takes from a request without LoRAs or ControlNets (lora_in, lora_out,
    control_width: contract.networks.ModelDims)."""

    tokens: object
    negative_tokens: object
    layer_scales: object
    widths: tuple[int, int, int]

    def rows(self, images: int, guided: bool) -> dict:
        """ip_tokens and ip_layer_scales for a step's rows: `images` per half, negative rows first when
        `guided` (without CFG, or after its truncation, the positive rows alone)."""
        import torch  # here, not at the module's top: the stream model checks requests without PyTorch

        tokens = self.tokens.expand(images, -1, -1)
        if guided:
            tokens = torch.cat([self.negative_tokens.expand(images, -1, -1), tokens])
        return {"ip_tokens": tokens, "ip_layer_scales": self.layer_scales[None].expand(tokens.shape[0], -1)}


def image_prompt(spec: ImagePromptSpec | None, image: np.ndarray | None, served: ServedIPAdapter, encode, device, widths) -> ImagePrompt | None:
    """The request's ImagePrompt: its image encoded by `encode` (pixel values -> (tokens, negative tokens),
    torch tensors: the image_encoder graph through BLS); None without one, or at scale 0 (no effect)."""
    import torch

    if spec is None or spec.scale == 0.0:
        return None
    tokens, negative = encode(served.pixel_values(image))
    scales = torch.from_numpy(layer_scales(served.layer_settings[spec.layers], spec.scale)).to(device)
    return ImagePrompt(tokens.to(device), negative.to(device), scales, widths)
