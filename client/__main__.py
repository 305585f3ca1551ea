"""python -m client "a prompt" -o out.png [options]: one file per image, seeds and time printed. The server
encodes them in the format of -o's extension (.png, .jpg/.jpeg, .webp; --quality for JPEG and WebP) and
sends only the files.
python -m client "a prompt" --stream [--preview-every K]: through sdxl_stream (gRPC), a progress line per
step and the previews written as out_step<k>.png, then the final images.
python -m client "a prompt" --image in.png [--strength S] [--mask mask.png]: img2img, or inpainting with a mask
(white: repaint, black: keep); the output has the image's size.
python -m client "a prompt" --high-noise-frac F: where the served refiner (recipe sdxl-base-refiner) takes over.
python -m client "a prompt" --control NAME=IMAGE[:SCALE[:START:END]] [--control-preprocess]: ControlNets the
server serves, each with its control image (the output's size), scale and window; repeatable.
python -m client "a prompt" --ip-image IMAGE [--ip-scale S] [--ip-layers style]: an image prompt (any size) for a
server that serves an IP-Adapter, its strength (0 to 2, default 1) and the layers that take it.
python -m client "a prompt" --session FRAMES [--fps F] [--prompt-file F] [--strength S] -o OUT_DIR: a real-time
painting session on sdxl_stream (frames from a directory of images or a video), latest frame wins; fps,
latency and skipped frames printed.
python -m client --info: the recipe the server serves (model, LoRAs, UNet, scheduler, steps, guidance, the
refiner and its hand-off), its ControlNets and its LoRA library (name, rank, targets, size: what --lora may
name). Model configs and the repository index are Triton admin APIs: --info sends the admin key
($SDXL_ADMIN_KEY, --admin-key-file, else the build/admin-key that make serve writes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contract.ip_adapters import LAYER_SETTINGS

from . import DEFAULT_URLS, FORMATS_BY_SUFFIX, ClientError, Control, StreamUpdate, controlnets, generate, info, loras


def output_paths(out: Path, count: int) -> list[Path]:
    """out.png for one image; out_0.png, out_1.png... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(count)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="Generate images with ensemble_sdxl, or with sdxl_stream (--stream).")
    parser.add_argument("prompt", nargs="?", help="the prompt (required unless --info)")
    parser.add_argument("--info", action="store_true", help="print the served recipe (from the scheduler model's config) and the LoRA library, and exit")
    parser.add_argument("--admin-key-file", type=Path, help="with --info: the file holding the server's admin key (model "
                        "configs are an admin API; default: $SDXL_ADMIN_KEY, else build/admin-key, which make serve writes)")
    parser.add_argument("-o", "--output", type=Path, default=Path("out.png"),
                        help="file path, numbered when several; its extension (.png, .jpg, .jpeg, .webp) is the format the server encodes")
    parser.add_argument("--quality", type=int, dest="output_quality", help="JPEG and WebP quality, 1 to 100 (server default 90)")
    parser.add_argument("--watermark", action=argparse.BooleanOptionalAction, dest="apply_watermark",
                        help="SDXL's invisible watermark on or off (default: the server's setting)")
    parser.add_argument("--url", help=f"HOST:PORT (default {DEFAULT_URLS['http']} for http, {DEFAULT_URLS['grpc']} for grpc)")
    parser.add_argument("--protocol", choices=("http", "grpc"), help="default: http; grpc with --stream (the only one it works with)")
    parser.add_argument("--stream", action="store_true", help="stream from sdxl_stream (gRPC): a progress line per step, "
                        "previews written as OUTPUT_step<k>.png; Ctrl-C cancels the request on the server")
    parser.add_argument("--preview-every", type=int, dest="preview_every",
                        help="with --stream: a preview after every k-th step (default 1; 0: progress only)")
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
    parser.add_argument("--image", type=Path, help="img2img: the init image (any format PIL reads; its size, "
                        "multiples of 64, is the output's)")
    parser.add_argument("--strength", type=float, help="with --image: the part of the schedule that runs, in (0, 1] "
                        "(default: the server's, 0.8); int(steps * strength) steps run")
    parser.add_argument("--mask", type=Path, help="with --image: inpainting; white (>= 128) repaints, black keeps "
                        "(greyscale, the image's size)")
    parser.add_argument("--high-noise-frac", type=float, dest="high_noise_frac",
                        help="where the served refiner takes over, in (0, 1] (default: the recipe's, 0.8 for "
                             "sdxl-base-refiner; 1: the base alone); see --info")
    parser.add_argument("--lora", type=lora_spec, action="append", dest="loras", metavar="NAME[:SCALE]",
                        help="a LoRA of the server's library (python -m export lora add), scale 1.0 unless given; repeatable")
    parser.add_argument("--control", type=control_spec, action="append", dest="controls", metavar="NAME=IMAGE[:SCALE[:START:END]]",
                        help="a ControlNet the server serves (see --info) with its control image (the output's size), scale "
                             "0 to 2 (default 1), and the window of the schedule it runs in (default 0:1); repeatable")
    parser.add_argument("--control-preprocess", action="store_true",
                        help="with --control: the server's preprocessor makes each control map from its image (ControlNets "
                             "that declare one); default: the images are the maps")
    parser.add_argument("--ip-image", type=Path, dest="ip_adapter_image", help="an image prompt (any format PIL reads, any "
                        "size) for a server that serves an IP-Adapter (docs/ip-adapter.md)")
    parser.add_argument("--ip-scale", type=float, dest="ip_adapter_scale", help="with --ip-image: its strength, 0 to 2 (default 1)")
    parser.add_argument("--ip-layers", dest="ip_adapter_layers", choices=tuple(LAYER_SETTINGS),
                        help="with --ip-image: the layers that take it (default all; style and layout: InstantStyle's)")
    parser.add_argument("--session", type=Path, metavar="FRAMES", help="a real-time session on sdxl_stream (gRPC): the frames of "
                        "a directory of images or a video file, each an img2img request at --strength (default 0.5), sent at "
                        "--fps; -o names the directory the answers go to (default session/)")
    parser.add_argument("--fps", type=float, default=8.0, help="with --session: frames sent per second (default 8; 0: as read)")
    parser.add_argument("--prompt-file", type=Path, help="with --session: the prompt, re-read whenever the file changes")
    return parser


def control_spec(text: str) -> tuple:
    """NAME=IMAGE[:SCALE[:START:END]] -> (name, image path, scale, start, end); the numbers are read from
    the right, so an image path may hold ':'. The server checks names and ranges."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--control {text!r}: expected NAME=IMAGE[:SCALE[:START:END]], e.g. canny=edges.png:0.8")
    parts = rest.split(":")
    for count in (3, 1):
        if len(parts) > count:
            try:
                numbers = [float(part) for part in parts[-count:]]
            except ValueError:
                continue
            image = ":".join(parts[:-count])
            scale, start, end = numbers if count == 3 else (numbers[0], 0.0, 1.0)
            return name, Path(image), scale, start, end
    return name, Path(rest), 1.0, 0.0, 1.0


def lora_spec(text: str) -> tuple[str, float]:
    """NAME[:SCALE]; the server checks the name and the scale's range."""
    name, sep, scale = text.rpartition(":") if ":" in text else (text, "", "")
    if not name:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: expected NAME[:SCALE], e.g. watercolor:0.8")
    try:
        return name, float(scale) if sep else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: bad scale {scale!r}; expected a number after ':'") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    key_file = args.pop("admin_key_file")
    if args.pop("info"):
        return print_info(args["url"], args["protocol"] or "http", key_file)
    session, fps, prompt_file = args.pop("session"), args.pop("fps"), args.pop("prompt_file")
    if session is not None:
        return session_main(parser, args, session, fps, prompt_file)
    if prompt_file is not None:
        parser.error("--prompt-file needs --session")
    if args["prompt"] is None:
        parser.error("the prompt is required (or --info)")
    prompt, output, timeout = args.pop("prompt"), args.pop("output"), args.pop("timeout")
    args["output_format"] = FORMATS_BY_SUFFIX.get(output.suffix.lower())
    if args["output_format"] is None:
        parser.error(f"-o {output}: the extension names the format; expected one of {', '.join(FORMATS_BY_SUFFIX)}")
    preprocess = args.pop("control_preprocess")
    if args["controls"]:
        args["controls"] = [Control(name, image, scale, start, end, preprocess) for name, image, scale, start, end in args["controls"]]
    elif preprocess:
        parser.error("--control-preprocess needs --control")
    if args["ip_adapter_image"] is None and (args["ip_adapter_scale"] is not None or args["ip_adapter_layers"] is not None):
        parser.error("--ip-scale and --ip-layers need --ip-image")
    stream = args.pop("stream")
    if stream:
        if args["protocol"] == "http":
            parser.error("--stream works over gRPC only (sdxl_stream is decoupled); drop --protocol http")
        args["protocol"] = "grpc"
        args["preview_every"] = 1 if args["preview_every"] is None else args["preview_every"]
    elif args["preview_every"] is not None:
        parser.error("--preview-every needs --stream")
    else:
        args["protocol"] = args["protocol"] or "http"
        del args["preview_every"]
    try:
        if stream:
            return stream_to_files(generate(prompt, timeout_s=timeout, stream=True, **args), output)
        result = generate(prompt, timeout_s=timeout, **args)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    write_files(output, result.encoded_images, result.seeds, result.nsfw_detected)
    print(f"{len(result.encoded_images)} image(s) in {result.seconds:.2f} s")
    return 0


def session_main(parser, args: dict, source: Path, fps: float, prompt_file: Path | None) -> int:
    from .session import run_session

    if args["prompt"] is None and prompt_file is None:
        parser.error("--session needs a prompt or --prompt-file")
    if args["protocol"] == "http":
        parser.error("--session works over gRPC only (sdxl_stream is decoupled); drop --protocol http")
    output = args["output"] if args["output"] != Path("out.png") else Path("session")
    options = {key: args[key] for key in ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "loras")
               if args.get(key) is not None}
    return run_session(source, output, args["prompt"], prompt_file, fps, 0.5 if args["strength"] is None else args["strength"],
                       url=args["url"], timeout_s=args["timeout"], **options)


def write_files(output: Path, files: list[bytes], seeds, nsfw_detected: list[bool] | None = None) -> list[Path]:
    """The server's encoded images as they came, a line each: path, seed, size, bytes, and the safety
    checker's verdict where the server runs one."""
    from PIL import Image

    paths = output_paths(output, len(files))
    verdicts = [("  nsfw detected" if flag else "  safety check passed") for flag in nsfw_detected] if nsfw_detected else [""] * len(files)
    for path, data, seed, verdict in zip(paths, files, seeds, verdicts):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        with Image.open(path) as image:
            print(f"{path}  seed {seed}  {image.width}x{image.height}  {len(data):,} bytes{verdict}")
    return paths


def write_images(output: Path, images) -> list[Path]:
    """Raw pixels (the stream's previews), encoded here by the extension."""
    from PIL import Image

    paths = output_paths(output, len(images))
    for path, image in zip(paths, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return paths


def stream_to_files(updates, output: Path) -> int:
    """A progress line per step, each preview written (OUTPUT_step<k>.png), then the final images.
    ClientError propagates; Ctrl-C closes the stream, which cancels the request on the server."""
    update: StreamUpdate | None = None
    try:
        for update in updates:
            line = f"step {update.step}/{update.num_inference_steps}  {update.seconds:6.2f} s"
            if update.final:
                print(line + "  final")
                write_files(output, update.encoded_images, update.seeds, update.nsfw_detected)
            elif update.images is not None:
                preview = output.with_name(f"{output.stem}_step{update.step}{output.suffix or '.png'}")
                paths = write_images(preview, update.images)
                print(line + "  preview " + " ".join(map(str, paths)))
            else:
                print(line)
    except KeyboardInterrupt:
        updates.close()  # stops the stream with cancellation
        print("cancelled", file=sys.stderr)
        return 130
    if update is None or not update.final:
        print("error: the stream ended without the final images", file=sys.stderr)
        return 1
    print(f"{len(update.encoded_images)} image(s) in {update.seconds:.2f} s")
    return 0


def print_info(url: str | None, protocol: str, admin_key_file: Path | None = None) -> int:
    try:
        recipe = info(url, protocol, admin_key_file=admin_key_file)
        served = controlnets(url, protocol, admin_key_file=admin_key_file)
        library = loras(url, protocol)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    recipe = {**recipe, "controlnets": ", ".join(served)}
    width = max(map(len, recipe))
    for key, value in recipe.items():
        print(f"{key:<{width}}  {value or '-'}")
    print()
    print(library_table(library))
    return 0


def library_table(library: list[dict]) -> str:
    from contract.loras import library_table as table

    if not library:
        return "LoRA library: empty (add one where the repository is: python -m export lora add NAME PATH)"
    return "LoRA library (what --lora may name):\n" + table(library)


if __name__ == "__main__":
    raise SystemExit(main())
