"""`python -m export random|tiny|onnx|configs|engines|lora ...`: see docs/exporting.md for the commands and
where the files go, docs/loras.md for the LoRA library."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from contract import layout, loras
from contract.recipes import PRESETS, PREVIEW_VAE, SCHEDULERS, SDXL_REFINER
from .progress import log
from .quantize import DEFAULT_CALIBRATION_COUNT, DEFAULT_PROMPTS_FILE, UNET_PRECISIONS, VAE_PRECISIONS
from .sources import (DEFAULT_LCM_LORA, DEFAULT_MODEL, DEFAULT_SAFETY_CHECKER, DEFAULT_VAE, DTYPES, REFINER_SUBFOLDER, ExportError,
                      LoraSpec, Sources)

ARCHITECTURES = ("tiny", "sdxl", "ssd-1b")


def _default_repository() -> str:
    return f"{layout.DEFAULT_REPOSITORY.relative_to(layout.REPO_ROOT)}/"


def _lora(text: str) -> LoraSpec:
    try:
        return LoraSpec.parse(text)
    except ExportError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _controlnet(text: str) -> tuple[str, str]:
    from contract.controlnets import ControlNetError, parse_flag

    try:
        return parse_flag(text)
    except ControlNetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _preprocessor(text: str) -> tuple[str, str]:
    from contract.controlnets import ControlNetError, parse_preprocessor_flag

    try:
        return parse_preprocessor_flag(text)
    except ControlNetError as error:
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

    random_ = commands.add_parser(
        "random", help="write a random-weight SDXL-family pipeline (+ lora/, alt_vae/, preview_vae/, safety_checker/, refiner/) in diffusers layout",
        description="--arch tiny: small widths, seconds, for tests and the CPU demo. --arch ssd-1b: the same small "
                    "widths with SSD-1B's UNet layout (its transformer depths per block, no attention in the mid "
                    "block). --arch sdxl: SDXL base 1.0's exact architecture (2.57 B UNet parameters), fp16 "
                    "safetensors, about 7.4 GB on disk (+ 4.5 GB for the refiner/ UNet), for measuring full-size export, engines and serving "
                    "without the hub.",
    )
    random_.add_argument("out_dir", type=Path)
    random_.add_argument("--arch", choices=ARCHITECTURES, default="tiny", help="tiny (default), ssd-1b or sdxl")
    random_.add_argument("--seed", type=_seed, default=0, help="weights seed (default 0)")
    tiny = commands.add_parser("tiny", help="same as: random OUT_DIR --arch tiny")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=_seed, default=0, help="weights seed (default 0)")
    tiny.set_defaults(arch="tiny")

    onnx = commands.add_parser(
        "onnx",
        help="export text_encoder, unet (LoRAs fused), vae_decoder, vae_encoder, preview_decoder, safety_checker (and refiner_unet with a refiner) to ONNX",
        description=(
            f"--preset NAME: a published recipe ({', '.join(PRESETS)}); flags given beside it override it. "
            f"Without --preset and --model: the lcm-sdxl preset ({DEFAULT_MODEL} + {DEFAULT_LCM_LORA}, any --lora "
            f"added after it, VAE {DEFAULT_VAE}, LCMScheduler). With --model and no --preset: only the --lora, --vae, "
            "--unet and --scheduler given (else the model's own VAE and UNet, and LCM)."
        ),
    )
    onnx.add_argument("--preset", choices=tuple(PRESETS), help="a published few-step recipe (docs/exporting.md, \"Recipes\")")
    onnx.add_argument("--model", help="diffusers SDXL directory or hub id")
    onnx.add_argument("--lora", type=_lora, action="append", default=[], metavar="ID_OR_PATH[:WEIGHT]",
                      help="LoRA to fuse (directory, .safetensors file, hub id, or HUB_ID/FILE.safetensors), weight 1.0 "
                           "unless given; repeatable")
    onnx.add_argument("--vae", help="VAE directory or hub id (a pipeline directory: its vae/)")
    onnx.add_argument("--unet", metavar="ID_OR_PATH", help="a distilled UNet in place of the model's: a diffusers UNet "
                      "directory, a .safetensors state dict, HUB_ID/FILE.safetensors (e.g. SDXL-Lightning's), or a hub id")
    onnx.add_argument("--preview-vae", metavar="ID_OR_DIR", help="the streaming endpoint's preview decoder, an "
                      "AutoencoderTiny (default: the model directory's preview_vae/ if it has one, else "
                      f"{PREVIEW_VAE})")
    onnx.add_argument("--safety-checker", metavar="ID_OR_DIR", help="the safety checker (diffusers' "
                      "StableDiffusionSafetyChecker and its preprocessor_config.json; the deployment switches it on: "
                      "docs/outputs.md) (default: the model directory's safety_checker/ if it has one, else "
                      f"{DEFAULT_SAFETY_CHECKER})")
    onnx.add_argument("--refiner", metavar="ID_OR_DIR", help="the SDXL refiner that finishes each image (a pipeline "
                      "directory or hub id: its unet/; or a UNet directory), exported as refiner_unet; requests' "
                      "high_noise_frac says where it takes over (default: the preset's; with --preset sdxl-base-refiner, "
                      f"the model directory's {REFINER_SUBFOLDER}/ if it has one, else {SDXL_REFINER})")
    onnx.add_argument("--controlnet", type=_controlnet, action="append", default=[], metavar="NAME=PATH",
                      help="an SDXL ControlNet (a diffusers ControlNet directory or hub id) served as model controlnet_NAME; "
                      "requests name it in control_names; repeatable (docs/controlnet.md)")
    onnx.add_argument("--controlnet-preprocessor", type=_preprocessor, action="append", default=[], metavar="NAME=KIND",
                      help="the preprocessor ControlNet NAME declares (canny, or depth with --depth-estimator): requests' "
                      "control_preprocess makes the control map from their image on the server; repeatable")
    onnx.add_argument("--depth-estimator", metavar="ID_OR_DIR", help="the depth model that makes depth control maps on the "
                      "server (a transformers depth-estimation model: depth-anything/Depth-Anything-V2-Small-hf), exported "
                      "as depth_estimator; serves the depth preprocessor and ControlNet-Union's depth mode (docs/controlnet.md)")
    onnx.add_argument("--ip-adapter", metavar="FILE", help="an IP-Adapter for image prompts (h94's SDXL layout: a .safetensors "
                      "or .bin file, or HUB_ID/PATH/FILE such as h94/IP-Adapter/sdxl_models/ip-adapter_sdxl_vit-h.safetensors; "
                      "the plain adapter or Plus), exported into unet_ip with --image-encoder (docs/ip-adapter.md)")
    onnx.add_argument("--image-encoder", metavar="ID_OR_DIR", help="the IP-Adapter's CLIP image encoder "
                      "(CLIPVisionModelWithProjection: a directory, hub id or HUB_ID/SUBFOLDER such as "
                      "h94/IP-Adapter/models/image_encoder for the vit-h adapters), exported as image_encoder")
    onnx.add_argument("--scheduler", choices=tuple(SCHEDULERS), help="the denoising loop's scheduler (trailing timestep "
                      "spacing for all but lcm; model: the model's own, class and config as its scheduler_config.json "
                      "has them); default: the preset's, else lcm")
    onnx.add_argument("--eta", type=float, help="eta of the stochastic steps (tcd's gamma, ddim's eta); default: the preset's")
    onnx.add_argument("--dtype", choices=DTYPES, default="fp16")
    onnx.add_argument("--unet-precision", choices=UNET_PRECISIONS, help="the UNet graphs' precision: fp8 (E4M3) or int8 "
                      "Q/DQ on its convolutions and linear layers, calibrated on the recipe's own steps, guidance and size "
                      "(docs/exporting.md, \"Quantized UNet and VAE\"); default: --dtype")
    onnx.add_argument("--vae-precision", choices=VAE_PRECISIONS, help="the VAE decoder's precision: int8 Q/DQ (MLPerf's "
                      "SDXL exclusions), calibrated on the recipe's final latents; default: --dtype")
    onnx.add_argument("--calibration-prompts", type=Path, metavar="FILE", help="prompts to calibrate 8-bit networks on, one "
                      f"a line (default: {DEFAULT_PROMPTS_FILE.relative_to(layout.REPO_ROOT)}, MLPerf's SDXL COCO captions)")
    onnx.add_argument("--calibration-count", type=int, default=DEFAULT_CALIBRATION_COUNT, metavar="N",
                      help=f"how many of the prompts (the first N; default {DEFAULT_CALIBRATION_COUNT})")
    onnx.add_argument("--calibration-size", type=int, metavar="PIXELS", help="height and width of the calibration "
                      "runs (default: the recipe's size, 1024 for SDXL's recipes); a multiple of 8")
    onnx.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    onnx.add_argument("--out", type=Path, default=layout.DEFAULT_REPOSITORY,
                      help=f"model repository to assemble: the configs and model.py files of "
                           f"{layout.TEMPLATES.relative_to(layout.REPO_ROOT)}/ (the templates) copied in, the graphs, "
                           f"tokenizers and scheduler config written beside them (default {_default_repository()})")
    configs_ = commands.add_parser(
        "configs", help="set the configs' tensor dtypes and widths to what the repository's graphs were exported with",
        description="`onnx` does this itself; run it when graphs and configs disagree (graphs copied in, configs "
                    "checked out again): text_encoder, unet, vae_decoder, vae_encoder, preview_decoder, refiner_unet, scheduler and denoiser, "
                    "every variant; the recipe into scheduler, denoiser, sdxl_stream and tokenizer.",
    )
    configs_.add_argument("--repository", type=Path, default=layout.DEFAULT_REPOSITORY,
                          help=f"model repository (default {_default_repository()})")
    configs_.add_argument("--dtype", choices=DTYPES, help="set this dtype (default: the graphs'); with no graphs, "
                          "e.g. to restore the fp16 configs that git holds")
    engines = commands.add_parser(
        "engines",
        help="build TensorRT engines (TensorRT-RTX with POLYGRAPHY_USE_TENSORRT_RTX=1) from the ONNX graphs",
        description="Profiles default to what the repository's production configs accept (max_batch_size, the "
                    "scheduler's size limits). An engine is rebuilt only when its graph or build settings change.",
    )
    engines.add_argument("--onnx", type=Path, default=layout.DEFAULT_REPOSITORY,
                         help=f"repository holding <name>/1/model.onnx (default {_default_repository()})")
    engines.add_argument("--out", type=Path, help=f"repository to write <name>/1/model.plan into (default: {_default_repository()} "
                         "for TensorRT, build/engines-rtx/ for TensorRT-RTX)")
    engines.add_argument("--max-batch", type=int, dest="max_images", help="images per request (default: the configs', 4)")
    engines.add_argument("--min-size", type=int, help="smallest height/width in pixels (default: the scheduler's, 512)")
    engines.add_argument("--opt-size", type=int, help="height/width the engines are tuned for (default 1024)")
    engines.add_argument("--max-size", type=int, help="largest height/width in pixels (default: the scheduler's, 1536)")
    engines.add_argument("--timing-cache", type=Path, help="timing cache file, read and updated (default under build/timing-cache/)")
    engines.add_argument("--refittable", action="store_true", help="build refittable engines (weights can be swapped later)")

    lora = commands.add_parser(
        "lora", help="the repository's LoRA library: what requests name in lora_names (docs/loras.md)",
        description="A LoRA added here is served to the next request that names it, on every instance of a running "
                    "server, without a restart; a removed one is refused from then on.",
    )
    lora_commands = lora.add_subparsers(dest="lora_command", required=True)
    repository_help = f"model repository whose library to change (default {_default_repository()}, what make serve serves)"
    lora_add = lora_commands.add_parser(
        "add", help="validate a LoRA and install it under NAME",
        description="PATH: a .safetensors file or a diffusers LoRA directory, in diffusers/PEFT or kohya/A1111 format "
                    "(lora_unet_..., lora_te1_..., lora_te2_... with alphas), read by diffusers' own loaders.")
    lora_add.add_argument("name", metavar="NAME", help=f"the name requests use ({loras.NAME_RULE})")
    lora_add.add_argument("path", metavar="PATH")
    lora_add.add_argument("--repository", type=Path, default=layout.DEFAULT_REPOSITORY, help=repository_help)
    lora_list = lora_commands.add_parser("list", help="the library: name, rank, targets, sites, size")
    lora_list.add_argument("--repository", type=Path, default=layout.DEFAULT_REPOSITORY, help=repository_help)
    lora_remove = lora_commands.add_parser("remove", help="take NAME out of the library")
    lora_remove.add_argument("name", metavar="NAME")
    lora_remove.add_argument("--repository", type=Path, default=layout.DEFAULT_REPOSITORY, help=repository_help)
    return parser


def run_lora(args) -> None:
    from . import lora

    if args.lora_command == "add":
        from contract.limits import Limits

        limits = Limits.from_parameters(_parameters(args.repository))
        info = lora.add(args.repository, args.name, args.path, limits.max_lora_rank)
        print(f"{info.name}: rank {info.rank}, {', '.join(info.targets)}; "
              + ", ".join(f"{network} {count} sites" for network, count in info.networks.items())
              + f"; {info.size_bytes / 1e6:.1f} MB in {loras.library_dir(args.repository) / info.name}")
    elif args.lora_command == "remove":
        lora.remove(args.repository, args.name)
        print(f"{args.name}: removed from {loras.library_dir(args.repository)}")
    else:
        print(lora.listing(args.repository))


def _parameters(repository: Path) -> dict[str, str]:
    """The scheduler's config parameters (the limits a deployment serves with), else the templates'."""
    from contract.configs import read_config

    source = repository if (Path(repository) / layout.SCHEDULER_MODEL / "config.pbtxt").exists() else layout.TEMPLATES
    config = read_config(source, layout.SCHEDULER_MODEL)
    return {key: value.string_value for key, value in config.parameters.items()}


def run_engines(args) -> None:
    from .engines import BuildSettings, build_engines, default_engine_repository, default_timing_cache, require_builder
    from .sources import check_writable

    require_builder()
    # The limits of the configs that will serve the plans: the graphs' repository's, else the templates'.
    configs_from = args.onnx if (args.onnx / layout.SCHEDULER_MODEL / "config.pbtxt").exists() else layout.TEMPLATES
    settings = BuildSettings.from_repository(
        configs_from, max_images=args.max_images, min_size=args.min_size, opt_size=args.opt_size,
        max_size=args.max_size, refittable=args.refittable or None,
    )
    out = args.out or default_engine_repository()
    check_writable(out)
    timing_cache = args.timing_cache or default_timing_cache()
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    defaults = BuildSettings.from_repository(configs_from)
    if settings.max_images != defaults.max_images:
        log(f"note: engines for {settings.max_images} images per request; the configs of {configs_from} say "
            f"{defaults.max_images}: update max_batch_size in {layout.TEMPLATES.name}/*/config.pbtxt (the templates) "
            "and the scheduler's max_images, then export again")
    for name, parsed in build_engines(args.onnx, out, settings, timing_cache=timing_cache).items():
        print(f"{name}: {layout.version_dir(out, name) / layout.ENGINE_FILE}" + ("" if parsed else " (up to date)"))


def run_random(args) -> None:
    from .sources import check_writable

    check_writable(args.out_dir, "OUT_DIR")
    if args.arch == "sdxl":
        from .sdxl import write_sdxl

        write_sdxl(args.out_dir, seed=args.seed)
    else:
        from .tiny import write_tiny

        write_tiny(args.out_dir, seed=args.seed, arch=args.arch)


def run_configs(args) -> None:
    from contract.configs import ConfigError, follow_exported_graphs, follow_recipe, recipe_file, repository_dtype
    from contract.recipes import DEFAULT_PRESET, read_recipe

    try:
        exported = repository_dtype(args.repository)
        if exported is None and args.dtype is None:
            raise ExportError(f"--repository {str(args.repository)!r}: no exported graphs (*/1/{layout.EXPORT_INFO_FILE}); "
                              "run `python -m export onnx` first, or give --dtype")
        changed = follow_exported_graphs(args.repository, dtype=args.dtype)
        # The recipe the export recorded; without one (no export), the default preset's, as git holds it.
        recipe = read_recipe(recipe_file(args.repository)) or PRESETS[DEFAULT_PRESET]
        changed += follow_recipe(args.repository, recipe)
    except (ConfigError, ValueError, TypeError) as error:
        raise ExportError(str(error)) from None
    for path in changed:
        print(f"{path}: updated")
    widths = "the exported graphs' widths" if exported else "SDXL's widths (no exported graphs)"
    print(f"{args.repository}: configs declare {args.dtype or exported} and {widths}, recipe {recipe.name}"
          + ("" if changed else " (nothing to change)"))


def run_onnx(args) -> None:
    from .onnx_export import export_pipeline
    from .sources import check_device, check_writable

    check_device(args.device)
    check_writable(args.out)
    recipe = resolve_recipe(args)
    log(f"recipe {recipe.name}: {recipe.model}" + "".join(f" + {lora}" for lora in recipe.loras)
        + (f", UNet {recipe.unet}" if recipe.unet else "") + (f", VAE {recipe.vae}" if recipe.vae else "")
        + ", " + (SCHEDULERS[recipe.scheduler].class_name or "the model's own scheduler")
        + (f", refiner {recipe.refiner} from {recipe.high_noise_frac:g} of the schedule" if recipe.refiner else ""))
    precisions = resolve_precisions(args, recipe)
    from contract.controlnets import ControlNetError, sources as controlnet_sources

    try:
        controlnets = controlnet_sources(args.controlnet, args.controlnet_preprocessor, args.depth_estimator is not None)
    except ControlNetError as error:
        raise ExportError(str(error)) from None
    if (args.ip_adapter is None) != (args.image_encoder is None):
        given, missing = ("--ip-adapter", "--image-encoder") if args.ip_adapter else ("--image-encoder", "--ip-adapter")
        raise ExportError(f"{given} needs {missing}: the adapter's tokens come from its own image encoder (docs/ip-adapter.md)")
    paths = export_pipeline(Sources.from_recipe(recipe, args.preview_vae, args.safety_checker, controlnets, args.depth_estimator,
                                                args.ip_adapter, args.image_encoder),
                            args.out, args.dtype,
                            device=args.device, recipe=recipe, precisions=precisions)
    for name, path in paths.items():
        print(f"{name}: {path}")


def resolve_precisions(args, recipe):
    """--unet-precision / --vae-precision, and for 8-bit networks what they are calibrated on."""
    from .quantize import Calibration, Precisions, check_precisions, read_prompts

    unet, vae = check_precisions(args.dtype, args.unet_precision, args.vae_precision)
    if args.calibration_size is not None and (args.calibration_size < 64 or args.calibration_size % 8):
        raise ExportError(f"--calibration-size {args.calibration_size}: expected a multiple of 8, at least 64")
    if unet == args.dtype and vae == args.dtype:
        return Precisions(unet, vae)
    path = args.calibration_prompts or DEFAULT_PROMPTS_FILE
    prompts = read_prompts(path, args.calibration_count)
    calibration = Calibration.for_recipe(recipe, prompts, size=args.calibration_size, source=path.name)
    log(f"calibration: {len(prompts)} prompts of {path}, {calibration.steps} steps, guidance {calibration.guidance:g}, "
        f"{calibration.size}x{calibration.size} ({recipe.name}'s)")
    return Precisions(unet, vae, calibration)


def resolve_recipe(args):
    """--preset with the flags beside it; see contract.recipes.resolve. A recipe's refiner, when
    --refiner is not given: the model directory's refiner/ if it has one (random pipelines do)."""
    from dataclasses import replace

    from contract.recipes import resolve

    try:
        recipe = resolve(args.preset, model=args.model, loras=tuple(str(lora) for lora in args.lora) or None, unet=args.unet,
                         vae=args.vae, scheduler=args.scheduler, eta=args.eta, refiner=args.refiner)
    except ValueError as error:
        raise ExportError(str(error)) from None
    own = Path(recipe.model).expanduser() / REFINER_SUBFOLDER
    if recipe.refiner is not None and args.refiner is None and own.is_dir():
        recipe = replace(recipe, refiner=str(own))
    return recipe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        {"random": run_random, "tiny": run_random, "onnx": run_onnx, "configs": run_configs, "engines": run_engines,
         "lora": run_lora}[args.command](args)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log(f"{args.command}: finished in {time.perf_counter() - start:.1f} s")
    return 0
