"""ControlNets per request: the inputs, their checks, and each request's ControlNets in its loop.

A request names ControlNets the deployment serves (`control_names`, [K]), one control image each
(`control_images`, UINT8 [K, H, W, 3] at the output size), and per name a scale (default 1.0, 0 to 2),
a guidance window [start, end) of the schedule (default [0, 1)) and whether the ControlNet's
preprocessor makes the control map (`control_preprocess`, default false: the image is the map). As
diffusers' `StableDiffusionXLControlNetPipeline` with a list of ControlNets (`MultiControlNetModel`):
at step i of n, a ControlNet runs when neither i / n < start nor (i + 1) / n > end (diffusers'
`controlnet_keep`; outside, its residuals are zeros, so it is not run here), on every UNet row (both
CFG halves), and its residuals times its scale are summed, in the order named, into the UNet's.

A ControlNet-Union's modes are named NAME/MODE (contract/controlnets.py UNION_MODES: union/depth,
union/canny...); the modes a request names of one union model take one pass at each step, as
`StableDiffusionXLControlNetUnionPipeline(control_mode=[...])`: a lone mode's residuals are scaled
after (diffusers' single-mode path), several modes' scales (times their windows' keep) act inside the
network and its residuals add unscaled. One deliberate difference: a pass whose modes are all at
scale 0 or all outside their windows does not run (diffusers' several-mode path still adds the union's
residuals then, without any control image's influence), so scale 0 means no ControlNet here as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from contract.controlnets import DEPTH, UNION_MODE_PREPROCESSORS, UNION_MODES, UNION_SEPARATOR, ServedControl, union_mode_names
from contract.limits import MAX_NAME_BYTES, Limits

from .endpoint import CONTROL_INPUT_NAMES, InvalidInput

MAX_CONTROL_SCALE = 2.0


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet of a request, checked: its name, the model serving it, its scale and window,
    and the index of its image in control_images."""

    name: str
    model: str
    scale: float
    start: float
    end: float
    preprocess: bool
    index: int
    mode: int | None = None  # a ControlNet-Union's control mode; None: a plain ControlNet

    def runs_at(self, index: int, count: int) -> bool:
        """Whether it runs at step `index` of the `count` the loop runs (diffusers' controlnet_keep)."""
        return not (index / count < self.start or (index + 1) / count > self.end)


def served_controlnets(repository) -> dict[str, ServedControl]:
    """{name a request uses: how it is served} of the ControlNet models a repository holds, as their export
    recorded them (export.json): a ControlNet's name; a ControlNet-Union's NAME/MODE for each of its modes."""
    import json

    from contract import layout
    from contract.networks import DEPTH_ESTIMATOR, UNION_CONTROLNET_NAME, controlnet_name, network_of

    served, has_depth = {}, layout.onnx_path(repository, DEPTH_ESTIMATOR.name).exists()
    for model in layout.controlnet_models(repository):
        info = layout.version_dir(repository, model) / layout.EXPORT_INFO_FILE
        declared = json.loads(info.read_text()).get("controlnet", {}) if info.exists() else {}
        name = controlnet_name(model)
        if network_of(model).name != UNION_CONTROLNET_NAME:
            served[name] = ServedControl(model, None, declared.get("preprocessor"))
            continue
        for mode in union_mode_names(int(declared.get("control_types", 6))):
            preprocessor = UNION_MODE_PREPROCESSORS.get(mode)
            if preprocessor == DEPTH and not has_depth:  # the depth mode's maps: only with the export's depth estimator
                preprocessor = None
            served[f"{name}{UNION_SEPARATOR}{mode}"] = ServedControl(model, UNION_MODES[mode], preprocessor)
    return served


def listing(served: Mapping[str, ServedControl]) -> str:
    """The names served, a union model's modes as NAME/{mode,...}: what an error lists as accepted."""
    if not served:
        return "none: export with --controlnet NAME=PATH to serve one"
    plain = [name for name, how in served.items() if how.mode is None]
    unions: dict[str, list[str]] = {}
    for name, how in served.items():
        if how.mode is not None:
            union, _, mode = name.partition(UNION_SEPARATOR)
            unions.setdefault(union, []).append(mode)
    return ", ".join([*sorted(plain), *(f"{union}{UNION_SEPARATOR}{{{','.join(modes)}}}" for union, modes in sorted(unions.items()))])


def parse_canny_thresholds(text: str) -> tuple[int, int]:
    """The loops' canny_thresholds parameter, "LOW,HIGH" (default 100,200: the SDXL canny ControlNet's
    diffusers example); ValueError naming it."""
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        low = high = -1
    if not 0 <= low <= high <= 255 * 8:
        raise ValueError(f"parameter canny_thresholds={text!r}: expected LOW,HIGH, integers with 0 <= LOW <= HIGH "
                         "(OpenCV's Canny hysteresis thresholds; default 100,200)")
    return low, high


def preprocess(kind: str, image: np.ndarray, canny_thresholds: tuple[int, int] = (100, 200)) -> np.ndarray:
    """The control map a preprocessor that runs in the loop makes from an RGB image (uint8 [H, W, 3] ->
    uint8 [H, W, 3]), as the published ControlNets' diffusers examples make it: canny, cv2.Canny on the
    image, on three channels (depth runs a network: serving/depth.py)."""
    if kind != "canny":
        raise ValueError(f"no preprocessor {kind!r} here; served: canny")
    import cv2  # here: only the loops that preprocess pay for it

    edges = cv2.Canny(np.ascontiguousarray(image), *canny_thresholds)
    return np.repeat(edges[:, :, None], 3, axis=2)


def _names(array: np.ndarray, limits: Limits, served: Mapping[str, ServedControl]) -> list[str]:
    array = np.asarray(array)
    if array.ndim != 1 or not 1 <= array.size <= limits.max_controlnets:
        raise InvalidInput("control_names", f"<{array.size} values, shape {list(array.shape)}>",
                           f"1 to {limits.max_controlnets} names (BYTES [K]; max_controlnets)")
    names = []
    for value in array:
        data = value if isinstance(value, (bytes, np.bytes_)) else str(value).encode("utf-8", "replace")
        if len(data) > MAX_NAME_BYTES:
            raise InvalidInput("control_names", f"<{len(data)} bytes>",
                               f"a name of at most {MAX_NAME_BYTES} bytes: one of {listing(served)}")
        name = bytes(data).decode("utf-8", "replace")
        if name not in served:
            raise InvalidInput("control_names", name, f"a ControlNet served here: {listing(served)}")
        names.append(name)
    return names


def _per_name(name: str, array: np.ndarray | None, count: int, default, dtype) -> np.ndarray:
    """A [K] input beside control_names: K values (omitted: K defaults)."""
    if array is None:
        return np.full(count, default, dtype=dtype)
    array = np.asarray(array)
    if array.ndim != 1 or array.size != count:
        raise InvalidInput(name, f"<{array.size} values, shape {list(array.shape)}>", f"one value per control name ([{count}])")
    return array


def _fraction(name: str, value: float, accepted: str) -> float:
    value = float(f"{float(value):.7g}")  # FP32 as sent
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InvalidInput(name, value, accepted)
    return value


def check_controls(raw: Mapping[str, np.ndarray | None], limits: Limits, served: Mapping[str, ServedControl],
                   size: tuple[int, int]) -> tuple[ControlSpec, ...]:
    """The request's ControlNets, checked (`size`: the output's (height, width)); () without control_names."""
    get = raw.get
    if get("control_names") is None:
        sent = [name for name in CONTROL_INPUT_NAMES[1:] if get(name) is not None]
        if sent:
            raise InvalidInput(sent[0], f"<{np.asarray(get(sent[0])).dtype} {list(np.asarray(get(sent[0])).shape)}>",
                               "no ControlNet inputs without control_names (the ControlNets they go with)")
        return ()
    names = _names(get("control_names"), limits, served)
    count = len(names)
    images = get("control_images")
    accepted = f"UINT8 [{count}, {size[0]}, {size[1]}, 3]: one RGB control image per name, at the output size"
    if images is None:
        raise InvalidInput("control_images", None, accepted)
    images = np.asarray(images)
    if images.dtype != np.uint8 or tuple(images.shape) != (count, *size, 3):
        raise InvalidInput("control_images", f"<{images.dtype} {list(images.shape)}>", accepted)
    scales = _per_name("control_scales", get("control_scales"), count, 1.0, np.float32)
    starts = _per_name("control_guidance_start", get("control_guidance_start"), count, 0.0, np.float32)
    ends = _per_name("control_guidance_end", get("control_guidance_end"), count, 1.0, np.float32)
    preprocess = _per_name("control_preprocess", get("control_preprocess"), count, False, np.bool_)
    controls = []
    for index, name in enumerate(names):
        scale = float(f"{float(scales[index]):.7g}")
        if not (math.isfinite(scale) and 0.0 <= scale <= MAX_CONTROL_SCALE):
            raise InvalidInput("control_scales", scale, f"a number from 0 to {MAX_CONTROL_SCALE:g} per name (0: no effect)")
        start = _fraction("control_guidance_start", starts[index], "a number in [0, 1) per name, below its end")
        end = _fraction("control_guidance_end", ends[index], "a number in (0, 1] per name, above its start")
        if not start < end:
            raise InvalidInput("control_guidance_start", f"{start:g} with control_guidance_end {end:g} for {name}",
                               "start < end, both in [0, 1]")
        if not isinstance(preprocess[index], (bool, np.bool_)):
            raise InvalidInput("control_preprocess", preprocess[index], "true or false per name (BOOL [K])")
        how = served[name]
        if preprocess[index] and how.preprocessor is None:
            raise InvalidInput("control_preprocess", f"true for {name}",
                               f"false for {name}: it declares no preprocessor; send its control map as the image")
        controls.append(ControlSpec(name, how.model, scale, start, end, bool(preprocess[index]), index, how.mode))
    return tuple(controls)
