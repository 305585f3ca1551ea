"""python -m client "a prompt" -o out.png [options]: one PNG per image, seeds and time printed.
python -m client --info: the recipe the server serves (model, LoRAs, UNet, scheduler, steps, guidance)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import DEFAULT_URLS, ClientError, generate, info


def output_paths(out: Path, count: int) -> list[Path]:
    """out.png for one image; out_0.png, out_1.png... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(count)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="Generate images with ensemble_sdxl.")
    parser.add_argument("prompt", nargs="?", help="the prompt (required unless --info)")
    parser.add_argument("--info", action="store_true", help="print the served recipe (from the scheduler model's config) and exit")
    parser.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG path (numbered when several)")
    parser.add_argument("--url", help=f"HOST:PORT (default {DEFAULT_URLS['http']} for http, {DEFAULT_URLS['grpc']} for grpc)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--seed", type=int, help="image i uses seed + i (default: random, printed)")
    parser.add_argument("--steps", type=int, dest="num_inference_steps",
                        help="denoising steps (range and default: the served recipe's, see --info; lcm-sdxl: 1-8, 4)")
    parser.add_argument("--guidance", type=float, dest="guidance_scale",
                        help="CFG scale; <= 1 turns CFG off (default: the recipe's; lcm-sdxl 1.0)")
    parser.add_argument("--negative", dest="negative_prompt", help="negative prompt (used with --guidance > 1)")
    parser.add_argument("--height", type=int, help="pixels, multiple of 64 (default 1024)")
    parser.add_argument("--width", type=int, help="pixels, multiple of 64 (default 1024)")
    parser.add_argument("--num-images", type=int, dest="num_images_per_prompt", help="images for this prompt (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--queue-timeout-ms", type=int, dest="queue_timeout_ms",
                        help="refuse the request (UNAVAILABLE) if it waits longer for a denoising slot (default: the server's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args.pop("info"):
        return print_info(args["url"], args["protocol"])
    if args["prompt"] is None:
        parser.error("the prompt is required (or --info)")
    prompt, output, timeout = args.pop("prompt"), args.pop("output"), args.pop("timeout")
    try:
        result = generate(prompt, timeout_s=timeout, **args)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    paths = output_paths(output, len(result.images))
    for path, image, seed in zip(paths, result.images, result.seeds):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        print(f"{path}  seed {seed}  {image.shape[1]}x{image.shape[0]}")
    print(f"{len(paths)} image(s) in {result.seconds:.2f} s")
    return 0


def print_info(url: str | None, protocol: str) -> int:
    try:
        recipe = info(url, protocol)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    width = max(map(len, recipe))
    for key, value in recipe.items():
        print(f"{key:<{width}}  {value or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
