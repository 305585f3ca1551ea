"""IP-Adapter image prompts (docs/ip-adapter.md): the request's inputs, their bounds, and the per-layer
settings, shared by the export (which resolves the settings against its UNet) and the loops.

An IP-Adapter (h94/IP-Adapter's SDXL files) adds, to each of the UNet's cross-attentions (`attn2`; 70 in
SDXL), a second attention over image tokens whose output is added times a scale. diffusers' loader
(`load_ip_adapter`) gives every such layer the scale 1.0; `set_ip_adapter_scale` sets it per layer, and
InstantStyle's settings in diffusers' IP-Adapter guide keep one or two layers on and the rest at 0:
- style: `{"up": {"block_0": [0.0, 1.0, 0.0]}}`, the second attention of the first up block;
- layout: `{"down": {"block_2": [0.0, 1.0]}}`, the second attention of the last down block;
- style_and_layout: both.
Here each is named by the attention modules it keeps (the prefix diffusers' set_ip_adapter_scale matches),
so that it means the same layers in any UNet of SDXL's block layout; a UNet without those modules does
not serve the setting (the export lists the settings it serves, with their per-layer masks).
"""

from __future__ import annotations

import math

import numpy as np

ALL = "all"
# setting -> the attention modules (diffusers' names) whose cross-attention keeps the image prompt; None: every one.
LAYER_SETTINGS: dict[str, tuple[str, ...] | None] = {
    ALL: None,
    "style": ("up_blocks.0.attentions.1",),
    "layout": ("down_blocks.2.attentions.1",),
    "style_and_layout": ("down_blocks.2.attentions.1", "up_blocks.0.attentions.1"),
}
DEFAULT_SCALE, MAX_SCALE = 1.0, 2.0
# The adapters' kinds, by their image projection: ImageProjection (the plain adapter: 4 tokens from the
# encoder's image_embeds) or Plus's Resampler (IPAdapterPlusImageProjection: its queries' tokens from the
# encoder's penultimate hidden states).
PLAIN, PLUS = "plain", "plus"


def ip_layer_names(attn_processor_names) -> list[str]:
    """The UNet's IP-Adapter layers in diffusers' order (the order of `unet.attn_processors`, the order in
    which h94's files number them 1, 3, 5...): its cross-attentions, `...attn2.processor`."""
    return [name for name in attn_processor_names if name.endswith("attn2.processor") and "motion_modules" not in name]


def layer_masks(layer_names: list[str]) -> dict[str, list[float]]:
    """Per layer setting the UNet serves, 1.0 where a layer keeps the image prompt and 0.0 elsewhere; a
    setting that keeps none of this UNet's layers is left out."""
    masks = {}
    for setting, kept in LAYER_SETTINGS.items():
        mask = [1.0 if kept is None or any(name.startswith(prefix + ".") for prefix in kept) else 0.0 for name in layer_names]
        if any(mask):
            masks[setting] = mask
    return masks


def check_scale(value) -> float:
    """ip_adapter_scale: a finite number in [0, MAX_SCALE] (ValueError otherwise, naming what is accepted)."""
    scale = float(value)
    if not (math.isfinite(scale) and 0.0 <= scale <= MAX_SCALE):
        raise ValueError(f"a number from 0 to {MAX_SCALE:g} (the image prompt's strength: 0 none, 1 diffusers' default)")
    return scale


def layer_scales(mask: list[float], scale: float) -> np.ndarray:
    """One row's ip_layer_scales: the setting's mask times the request's scale, fp32 [ip_layers]."""
    return np.asarray(mask, dtype=np.float32) * np.float32(scale)
