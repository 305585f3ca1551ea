"""Depth control maps on the server (control_preprocess of a ControlNet declaring `depth`, and a
ControlNet-Union's depth mode): the depth estimator's image processor on the loop's CPU, the
`depth_estimator` graph (contract/networks.py DEPTH_ESTIMATOR), then diffusers' SDXL depth ControlNet
example's normalization: the depth resized to the output size (bicubic), scaled to [0, 1] by its own
minimum and maximum, on three channels, x 255 and truncated to uint8."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from contract import layout
from contract.networks import DEPTH_ESTIMATOR

Estimate = Callable[[torch.Tensor], torch.Tensor]  # pixel_values [1, 3, h, w] -> predicted_depth [1, h, w]


def depth_map(depth: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] control map of a predicted depth [1, h, w] at `size` (H, W); a depth without any
    contrast (its minimum is its maximum) gives a black map."""
    resized = torch.nn.functional.interpolate(depth[:, None].float(), size=size, mode="bicubic", align_corners=False)
    low, high = resized.amin(dim=(1, 2, 3), keepdim=True), resized.amax(dim=(1, 2, 3), keepdim=True)
    normalized = (resized - low) / (high - low) if bool((high > low).all()) else torch.zeros_like(resized)
    image = torch.cat([normalized] * 3, dim=1).permute(0, 2, 3, 1).cpu().numpy()[0]
    return (image * 255.0).clip(0, 255).astype(np.uint8)


def resized_size(height: int, width: int, size: tuple[int, int], keep_aspect_ratio: bool, multiple: int) -> tuple[int, int]:
    """DPT's resize rule (transformers' DPTImageProcessor): with the aspect kept, the scale nearer 1 of
    the two fits both sides; each side to the nearest multiple of `multiple`."""
    scale_height, scale_width = size[0] / height, size[1] / width
    if keep_aspect_ratio:
        if abs(1 - scale_width) < abs(1 - scale_height):
            scale_height = scale_width
        else:
            scale_width = scale_height
    return tuple(max(multiple, round(side / multiple) * multiple) for side in (scale_height * height, scale_width * width))


class DepthPreprocessor:
    """The repository's depth preprocessor: the depth estimator's image processor, as its config beside the
    graph says (preprocessor_config.json), computed here as transformers' PIL backend of DPTImageProcessor
    computes it (PIL's resize of the uint8 image, x rescale_factor in float64 then float32, ImageNet mean
    and std), so that the loops need no transformers import (tests/test_controlnet.py: equal to it)."""

    def __init__(self, repository: Path):
        import json

        config = json.loads((layout.version_dir(repository, DEPTH_ESTIMATOR.name) / layout.DEPTH_PREPROCESSOR_FILE).read_text())
        size = config.get("size", {"height": 518, "width": 518})
        self.size = (int(size["height"]), int(size["width"]))
        self.keep_aspect_ratio = bool(config.get("keep_aspect_ratio", False))
        self.multiple = int(config.get("ensure_multiple_of", 1))
        self.resample = int(config.get("resample", 3))  # PIL's BICUBIC
        self.rescale_factor = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        self.mean = np.asarray(config.get("image_mean", [0.485, 0.456, 0.406]), np.float32)
        self.std = np.asarray(config.get("image_std", [0.229, 0.224, 0.225]), np.float32)
        self.normalize = bool(config.get("do_normalize", True))

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """The depth estimator's input for an RGB image (uint8 [H, W, 3]): float32 [1, 3, h, w]."""
        from PIL import Image

        height, width = resized_size(image.shape[0], image.shape[1], self.size, self.keep_aspect_ratio, self.multiple)
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(image), mode="RGB").resize((width, height), resample=self.resample))
        values = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.normalize:
            values = (values - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1))[None])

    def __call__(self, image: np.ndarray, estimate: Estimate) -> np.ndarray:
        return depth_map(estimate(self.pixel_values(image)), image.shape[:2])
