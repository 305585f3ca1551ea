"""The safety checker's two halves outside its graph, as diffusers runs them around
`StableDiffusionSafetyChecker` (`run_safety_checker` of its Stable Diffusion pipelines):

1. `pixel_values`: the final uint8 images preprocessed as the processor the export saved
   (preprocessor_config.json) does: PIL bicubic resize of the shortest edge to 224, center crop,
   rescale, CLIP's mean and std. Written here with PIL and numpy, bit-exact to transformers'
   CLIPImageProcessorPil (tested), which would cost each endpoint process an import of transformers
   and PyTorch (about 2 s and 200 MB).
2. `flags`: the graph's cosine distances scored as `StableDiffusionSafetyChecker.forward` scores
   them: `round(distance - threshold + adjustment, 3) > 0`, the adjustment becoming 0.01 after the
   first special-care concept that scores above 0 (for the special-care concepts after it and for
   every concept), and an image flagged when any concept scores above 0. Same operations on the same
   types (fp32 distances, thresholds as Python floats), so the flags are diffusers'.

The deployment's policy (`off`, `flag`, `black`) says what a flag does: nothing is checked; the
image is returned with its flag; or it is replaced by black (diffusers' behaviour), flagged too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from contract import layout

POLICIES = ("off", "flag", "black")


class ClipPreprocessor:
    """CLIPImageProcessor's steps for the configs CLIP checkpoints publish (every step on, the
    shortest edge resized): the same PIL resize and the same numpy arithmetic and dtypes."""

    def __init__(self, config: dict, source: str):
        needed = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
        if not all(config.get(key, True) for key in needed) or "shortest_edge" not in config.get("size", {}):
            raise ValueError(f"{source}: a preprocessor config this server does not implement (it needs {', '.join(needed)} "
                             f"and size.shortest_edge): {json.dumps({k: config.get(k) for k in (*needed, 'size')})}")
        self.size = int(config["size"]["shortest_edge"])
        self.crop = int(config["crop_size"]["height"]), int(config["crop_size"]["width"])
        self.resample = int(config.get("resample", 3))
        self.scale = float(config.get("rescale_factor", 1 / 255))
        self.mean = np.asarray(config["image_mean"], dtype=np.float32)
        self.std = np.asarray(config["image_std"], dtype=np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] -> fp32 [3, crop height, crop width]."""
        from PIL import Image

        height, width = image.shape[:2]
        short, long = sorted((height, width))
        resized_long = int(self.size * long / short)
        size = (self.size, resized_long) if height <= width else (resized_long, self.size)  # (height, width)
        pixels = np.asarray(Image.fromarray(image).resize(size[::-1], self.resample))
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        pixels = pixels[top:top + self.crop[0], left:left + self.crop[1]]
        pixels = (pixels.astype(np.float64) * self.scale).astype(np.float32)
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1)


class SafetyChecker:
    """Preprocessing and scoring of the exported checker in `version_dir` (its thresholds.json and
    preprocessor_config.json)."""

    def __init__(self, version_dir: Path, policy: str):
        if policy not in ("flag", "black"):
            raise ValueError(f"safety checker policy {policy!r}: expected flag or black (off: no checker)")
        version_dir = Path(version_dir)
        missing = [name for name in (layout.SAFETY_THRESHOLDS_FILE, layout.SAFETY_PREPROCESSOR_FILE)
                   if not (version_dir / name).exists()]
        if missing:
            raise ValueError(f"{version_dir}: no {', '.join(missing)}; export the safety checker again (python -m export onnx)")
        thresholds = json.loads((version_dir / layout.SAFETY_THRESHOLDS_FILE).read_text())
        self.concept_thresholds = [float(t) for t in thresholds["concept"]]
        self.special_thresholds = [float(t) for t in thresholds["special_care"]]
        preprocessor = version_dir / layout.SAFETY_PREPROCESSOR_FILE
        self.preprocess = ClipPreprocessor(json.loads(preprocessor.read_text()), str(preprocessor))
        self.policy = policy

    def pixel_values(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images [N, H, W, 3] -> the checker's fp32 input [N, 3, 224, 224]."""
        return np.stack([self.preprocess(image) for image in images])

    def flags(self, concept_distances: np.ndarray, special_distances: np.ndarray) -> np.ndarray:
        """One bool per image, as StableDiffusionSafetyChecker.forward decides it."""
        flagged = []
        for concepts, specials in zip(concept_distances.astype(np.float32), special_distances.astype(np.float32)):
            adjustment = 0.0
            for distance, threshold in zip(specials, self.special_thresholds):
                if round(distance - threshold + adjustment, 3) > 0:
                    adjustment = 0.01
            flagged.append(any(round(distance - threshold + adjustment, 3) > 0
                               for distance, threshold in zip(concepts, self.concept_thresholds)))
        return np.asarray(flagged, dtype=bool)

    def blackout(self, images: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """The images as the policy returns them: flagged ones black under `black`."""
        if self.policy != "black" or not flags.any():
            return images
        images = images.copy()
        images[flags] = 0
        return images
