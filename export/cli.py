"""`python -m export tiny|onnx ...`: see README.md for the commands and where the files go."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import layout
from .progress import log
from .sources import DEFAULT_LCM_LORA, DEFAULT_MODEL, DEFAULT_VAE, ExportError, LoraSpec, Sources


def _lora(text: str) -> LoraSpec:
    try:
        return LoraSpec.parse(text)
    except ExportError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"--seed {text!r}: expected an integer in [0, 2**32)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny", help="write a tiny random-weight SDXL pipeline (+ lora/, alt_vae/) for tests and the CPU demo")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=_seed, default=0, help="weights seed (default 0)")

    onnx = commands.add_parser(
        "onnx",
        help="export text_encoder, unet (LoRAs fused) and vae_decoder to ONNX",
        description=(
            f"Without --model: {DEFAULT_MODEL} + {DEFAULT_LCM_LORA} (weight 1.0, any --lora added after it) + "
            f"VAE {DEFAULT_VAE}. With --model: only the --lora and --vae given (else the model's own VAE)."
        ),
    )
    onnx.add_argument("--model", help="diffusers SDXL directory or hub id")
    onnx.add_argument("--lora", type=_lora, action="append", default=[], metavar="ID_OR_PATH[:WEIGHT]",
                      help="LoRA to fuse (directory, .safetensors file or hub id), weight 1.0 unless given; repeatable")
    onnx.add_argument("--vae", help="VAE directory or hub id (a pipeline directory: its vae/)")
    onnx.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    onnx.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    onnx.add_argument("--out", type=Path, default=layout.DEFAULT_REPOSITORY,
                      help=f"model repository root (default {layout.DEFAULT_REPOSITORY.relative_to(layout.REPO_ROOT)}/)")
    return parser


def run_tiny(args) -> None:
    from .onnx_export import check_writable
    from .tiny import write_tiny

    check_writable(args.out_dir)
    write_tiny(args.out_dir, seed=args.seed)


def run_onnx(args) -> None:
    from .onnx_export import check_writable, export_pipeline
    from .sources import check_device, load_pipeline

    check_device(args.device)
    check_writable(args.out)
    sources = Sources.resolve(args.model, args.lora, args.vae)
    loaded = load_pipeline(sources, dtype=args.dtype, device=args.device)
    paths = export_pipeline(loaded, args.out, args.dtype, device=args.device)
    for name, path in paths.items():
        print(f"{name}: {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        {"tiny": run_tiny, "onnx": run_onnx}[args.command](args)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log(f"{args.command}: finished in {time.perf_counter() - start:.1f} s")
    return 0
