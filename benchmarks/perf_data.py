"""perf_analyzer input data for img2img and inpainting: the text-to-image requests of
perf/ensemble_sdxl_cpu.json (four prompts of different lengths, CFG on half), each with an init
image (base64, as perf_analyzer takes binary tensors), a strength, and for inpainting a mask; and
the text-to-image requests with `output_format: jpeg` (perf_analyzer, asking for every output, gets
the pixels and the files).

    python -m benchmarks.perf_data [--size 128] [--out perf]      # perf/img2img_cpu.json, perf/inpaint_cpu.json,
                                                                  # perf/ensemble_sdxl_jpeg_{cpu,1024}.json
    python -m benchmarks.perf_data --size 1024 --out build/perf   # build/perf/img2img_1024.json, inpaint_1024.json

The 128² files are committed (tests/test_perf_data.py checks they are what this writes); the 1024²
ones are 4 MB each of base64, so they are written where they are used:
`make perf PERF_DATA=build/perf/img2img_1024.json` after `make perf-data`.
The images are deterministic pictures (smooth colour, an edge), the masks a centred rectangle.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np

from contract.layout import REPO_ROOT

TEXT_DATA = REPO_ROOT / "perf" / "ensemble_sdxl_cpu.json"
STRENGTHS = (0.5, 0.75, 1.0, 0.5)  # UNet steps of 4: 2, 3, 4, 2


def picture(size: int, seed: int) -> np.ndarray:
    """uint8 [size, size, 3]: what an init image looks like to a VAE (smooth colour and an edge)."""
    y, x = np.mgrid[0:size, 0:size] / size
    phase = np.random.default_rng(seed).uniform(0, 3)
    channels = (255 * (0.5 + 0.5 * np.sin(6 * x + phase)), 255 * y, np.where(x + y > 0.8, 220.0, 30.0))
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def rectangle_mask(size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    return mask


def binary(array: np.ndarray) -> dict:
    return {"b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii"), "shape": list(array.shape)}


def entries(size: int, inpainting: bool) -> list[dict]:
    """The text requests at `size`, each with its image (and mask)."""
    data = []
    for index, entry in enumerate(json.loads(TEXT_DATA.read_text())["data"]):
        request = {**entry, "height": [size], "width": [size], "image": binary(picture(size, index)),
                   "strength": [STRENGTHS[index % len(STRENGTHS)]]}
        if inpainting:
            request["mask"] = binary(rectangle_mask(size))
        data.append(request)
    return data


def jpeg_entries(text_data: Path) -> list[dict]:
    """The text-to-image requests of `text_data`, answered as JPEG files (quality 90)."""
    return [{**entry, "output_format": ["jpeg"], "output_quality": [90]} for entry in json.loads(text_data.read_text())["data"]]


def file_name(kind: str, size: int) -> str:
    return f"{kind}_{'cpu' if size == 128 else size}.json"


def write(out: Path, size: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, inpainting in (("img2img", False), ("inpaint", True)):
        path = out / file_name(kind, size)
        path.write_text(json.dumps({"data": entries(size, inpainting)}, indent=1) + "\n")
        paths.append(path)
    if size == 128:  # JPEG answers to the committed text requests, both sizes (small files)
        for name in ("cpu", "1024"):
            path = out / f"ensemble_sdxl_jpeg_{name}.json"
            path.write_text(json.dumps({"data": jpeg_entries(TEXT_DATA.with_name(f"ensemble_sdxl_{name}.json"))}, indent=1) + "\n")
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="height and width of the images (default 128: the CPU data)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "perf", help="directory (default perf/)")
    args = parser.parse_args(argv)
    for path in write(args.out, args.size):
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
