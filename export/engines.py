"""TensorRT engines from the exported ONNX graphs, built with polygraphy.

One code path for both kinds of engine: TensorRT plans (Triton's tensorrt backend, datacenter GPUs)
by default, TensorRT-RTX engines with `POLYGRAPHY_USE_TENSORRT_RTX=1` (RTX GPUs; and here, where
TensorRT-RTX builds ahead of time without a GPU, the check that the graphs parse and the profiles
build). Networks are strongly typed: the fp16 graphs carry their own precision, the form both
accept (TensorRT-RTX has no precision flags).

Profiles follow the repository: batch ranges from the production configs' `max_batch_size` (the
UNet's is the images-per-request limit doubled by CFG), sizes from the scheduler's limits. An engine
is rebuilt only when its fingerprint changes: a hash of the graph's files plus the build settings
and the builder's version, kept in `model.plan.json` beside the plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from contract import layout, networks
from contract.layout import ENGINE_FILE, FINGERPRINT_FILE
from contract.networks import ModelDims, NetworkSpec

from .progress import log
from .sources import ExportError


class EngineError(ExportError):
    """A graph the parser rejects, a profile the builder refuses, bad settings: named, no half file."""


def using_tensorrt_rtx() -> bool:
    from polygraphy import config

    return bool(config.USE_TENSORRT_RTX)


def trt_module():
    from polygraphy.mod.trt_importer import lazy_import_trt

    return lazy_import_trt()


def require_builder() -> str:
    """The builder's name and version, or an EngineError saying what to install: polygraphy
    imports TensorRT lazily and would otherwise fail mid-build with a traceback."""
    import importlib.util

    module = "tensorrt_rtx" if using_tensorrt_rtx() else "tensorrt"
    if importlib.util.find_spec(module) is None:  # asked first: polygraphy's own import failure is a traceback
        if using_tensorrt_rtx():
            raise EngineError("TensorRT-RTX is not installed (no module tensorrt_rtx); install it with "
                              "`pip install -r requirements/base.txt` (or `make install`)")
        raise EngineError("TensorRT is not installed (no module tensorrt): on a GPU machine run `make install-gpu` "
                          "(the TensorRT of the Triton release that serves the plans, TRT_VERSION); without a GPU, "
                          "build TensorRT-RTX engines with `make engines-rtx`")
    return ("TensorRT-RTX " if using_tensorrt_rtx() else "TensorRT ") + trt_module().__version__


@dataclass(frozen=True)
class BuildSettings:
    """What the engines must accept. Defaults: the production configs of the repository."""

    max_images: int = 4  # images per request; the UNet sees twice as many with CFG
    text_encoder_max_batch: int = 8
    min_size: int = 512
    opt_size: int = 1024
    max_size: int = 1536
    size_multiple: int = 64
    # The LoRA inputs' rank (contract/loras.py): 1 (no LoRA) to max_loras x max_lora_rank; tuned for
    # one LoRA of rank 16 (published style LoRAs are mostly 8 to 64).
    max_lora_rank: int = 256
    opt_lora_rank: int = 16
    # A ControlNet-Union's mode slots per row: 1 to the ControlNets a request may name (max_controlnets).
    max_control_modes: int = 3
    refittable: bool = False

    @classmethod
    def from_repository(cls, repository: Path, **overrides) -> "BuildSettings":
        from contract.configs import read_config, scheduler_limits  # Triton's config schema, from tritonclient

        limits = scheduler_limits(repository)
        values = dict(
            max_images=limits.max_images,
            text_encoder_max_batch=read_config(repository, "text_encoder").max_batch_size,
            min_size=limits.min_size,
            max_size=limits.max_size,
            size_multiple=limits.size_multiple,
            max_lora_rank=limits.max_stacked_rank,
            max_control_modes=max(1, limits.max_controlnets),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        m = self.size_multiple
        for flag, value in (("--min-size", self.min_size), ("--opt-size", self.opt_size), ("--max-size", self.max_size)):
            if value <= 0 or value % m:
                raise EngineError(f"{flag} {value}: expected a positive multiple of {m}")
        if not self.min_size <= self.opt_size <= self.max_size:
            raise EngineError(f"--min-size {self.min_size}, --opt-size {self.opt_size}, --max-size {self.max_size}: "
                              "expected min <= opt <= max")
        if self.max_images < 1:
            raise EngineError(f"--max-batch {self.max_images}: expected at least 1 image per request")

    def batch_range(self, network: str) -> tuple[int, int, int]:
        """(min, opt, max) batch: opt is one image without CFG (LCM-LoRA's default guidance)."""
        maximum = {
            networks.TEXT_ENCODER.name: self.text_encoder_max_batch,
            networks.UNET.name: 2 * self.max_images,
            networks.UNET_LORA.name: 2 * self.max_images,
            networks.REFINER_UNET.name: 2 * self.max_images,  # the UNet's rows, for the steps after the hand-off
            networks.UNET_CONTROL.name: 2 * self.max_images,
            networks.UNET_IP_NAME: 2 * self.max_images,
            networks.IMAGE_ENCODER.name: self.max_images,  # one image prompt per request, batched across requests
            networks.CONTROLNET.name: 2 * self.max_images,  # a ControlNet runs on the UNet's rows (both CFG halves)
            networks.UNION_CONTROLNET.name: 2 * self.max_images,
            networks.DEPTH_ESTIMATOR.name: self.max_images,  # one control image per call, batched across requests
            networks.VAE_DECODER.name: self.max_images,
            networks.PREVIEW_DECODER.name: self.max_images,
            networks.VAE_ENCODER.name: self.max_images,  # one init image per request, batched across requests
            networks.SAFETY_CHECKER.name: self.max_images,  # a request's final images
        }[network]
        return 1, 1, maximum


Shape = tuple[int, ...]


def profile_shapes(spec: NetworkSpec, dims: ModelDims, settings: BuildSettings) -> dict[str, tuple[Shape, Shape, Shape]]:
    """min/opt/max of every input of `spec`, from the settings (latent sizes are image sizes / 8)."""
    batches = settings.batch_range(spec.name)
    sizes = (settings.min_size, settings.opt_size, settings.max_size)
    shapes = {}
    ranks = (1, min(settings.opt_lora_rank, settings.max_lora_rank), settings.max_lora_rank)
    modes = (1, 1, settings.max_control_modes)
    # Depth Anything's processor: one side at 518, the other at most the endpoint's aspect limit times it.
    longest = -(-networks.DEPTH_SIDE * settings.max_size // settings.min_size // networks.DEPTH_PATCH) * networks.DEPTH_PATCH
    depths = (networks.DEPTH_SIDE, networks.DEPTH_SIDE, longest)
    for tensor in spec.inputs:
        shapes[tensor.name] = tuple(
            tensor.shape(dims, batch=b, latent_height=s // dims.vae_scale_factor, latent_width=s // dims.vae_scale_factor,
                         lora_rank=r, control_modes=m, depth_height=d, depth_width=d)
            for b, s, r, m, d in zip(batches, sizes, ranks, modes, depths)
        )
    return shapes


@dataclass
class ParsedNetwork:
    """What the builder is given: the parsed network's interface and the profile."""

    name: str
    inputs: dict[str, tuple[str, Shape]]  # name -> (TensorRT dtype name, dims with -1 for dynamic)
    outputs: dict[str, tuple[str, Shape]]
    profile: dict[str, tuple[Shape, Shape, Shape]]
    strongly_typed: bool


def _graph_files(onnx_path: Path) -> list[Path]:
    data = onnx_path.parent / layout.ONNX_DATA_FILE
    return [onnx_path] + ([data] if data.exists() else [])


def fingerprint(onnx_path: Path, profile: dict, settings: BuildSettings) -> dict:
    digest = hashlib.sha256()
    for path in _graph_files(onnx_path):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    trt = trt_module()
    return {
        "graph_sha256": digest.hexdigest(),
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
        "refittable": settings.refittable,
        "strongly_typed": True,
        "builder": ("tensorrt_rtx " if using_tensorrt_rtx() else "tensorrt ") + trt.__version__,
    }


def parse_network(onnx_path: Path, spec: NetworkSpec):
    """(builder, network, parser) for a strongly typed network; the parser's own errors on failure."""
    from polygraphy.backend.trt import CreateNetwork
    from polygraphy.backend.trt import util as trt_util

    trt = trt_module()
    builder, network = CreateNetwork(strongly_typed=True)()
    parser = trt.OnnxParser(network, trt_util.get_trt_logger())
    ok = parser.parse_from_file(str(onnx_path))  # from the file, so external weights are found
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        detail = "; ".join(errors) or "no error given"
        raise EngineError(f"{spec.name}: TensorRT's ONNX parser rejected {onnx_path}: {detail}")
    return builder, network, parser


def describe_network(network, spec: NetworkSpec, profile: dict) -> ParsedNetwork:
    def interface(tensors):
        return {t.name: (t.dtype.name, tuple(t.shape)) for t in tensors}

    inputs = interface(network.get_input(i) for i in range(network.num_inputs))
    outputs = interface(network.get_output(i) for i in range(network.num_outputs))
    return ParsedNetwork(spec.name, inputs, outputs, profile, strongly_typed=True)


def build_engine(
    onnx_path: Path, spec: NetworkSpec, dims: ModelDims, settings: BuildSettings, out_dir: Path, *,
    timing_cache: Path | None = None, force: bool = False,
) -> tuple[ParsedNetwork | None, bool]:
    """Build `out_dir/model.plan` unless its fingerprint matches: (what the builder got, True), or
    (None, False) when the engine is up to date."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.exception import PolygraphyException

    profile = profile_shapes(spec, dims, settings)
    engine_path, stamp_path = out_dir / ENGINE_FILE, out_dir / FINGERPRINT_FILE
    wanted = fingerprint(onnx_path, profile, settings)
    if not force and engine_path.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == wanted:
        log(f"{spec.name}: {engine_path} is up to date (same graph, settings and builder), not rebuilt")
        return None, False
    # From here on an existing engine no longer matches its graph: never leave it to be served.
    for stale in (engine_path, stamp_path):
        stale.unlink(missing_ok=True)
    builder, network, parser = parse_network(onnx_path, spec)
    parsed = describe_network(network, spec, profile)

    trt_profile = Profile()
    for name, (low, opt, high) in profile.items():
        trt_profile.add(name, low, opt, high)
    config = CreateConfig(
        profiles=[trt_profile], refittable=settings.refittable or None,
        load_timing_cache=str(timing_cache) if timing_cache else None,
    )
    kind = "TensorRT-RTX" if using_tensorrt_rtx() else "TensorRT"
    log(f"{spec.name}: building a {kind} engine from {onnx_path} ...")
    start = time.perf_counter()
    try:
        serialized = EngineBytesFromNetwork(
            (builder, network, parser), config=config, save_timing_cache=str(timing_cache) if timing_cache else None
        )()
    except PolygraphyException as error:
        raise EngineError(f"{spec.name}: the {kind} builder refused the network or its profile "
                          f"{ {k: [list(s) for s in v] for k, v in profile.items()} }: {error}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(engine_path, memoryview(serialized))
    _write_atomically(stamp_path, (json.dumps(wanted, indent=2) + "\n").encode())
    log(f"{spec.name}: {engine_path}, {engine_path.stat().st_size / 1e6:.1f} MB, built in {time.perf_counter() - start:.1f} s")
    return parsed, True


def _write_atomically(path: Path, data) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
        temporary = Path(f.name)
    os.replace(temporary, path)


def graph_dims(onnx_dir: Path) -> ModelDims:
    """The model dims the exporter recorded beside the graph (export.json)."""
    info = onnx_dir / layout.EXPORT_INFO_FILE
    if not info.exists():
        raise EngineError(f"no {info}: export the graphs first (python -m export onnx)")
    return ModelDims(**json.loads(info.read_text())["dims"])


def build_engines(
    onnx_repository: Path, out_repository: Path, settings: BuildSettings, *, timing_cache: Path | None = None,
    names: tuple[str, ...] | None = None,
) -> dict[str, ParsedNetwork | None]:
    """Engines for the named networks (default: those the repository serves), from
    `<onnx>/<name>/1/model.onnx` to `<out>/<name>/1/model.plan`."""
    log(f"builder: {require_builder()}")
    results = {}
    names = layout.served_networks(onnx_repository) if names is None else names
    for name in names:
        spec = networks.network_of(name)
        onnx_dir = layout.version_dir(onnx_repository, name)
        onnx_path = onnx_dir / layout.ONNX_FILE
        if not onnx_path.exists():
            raise EngineError(f"{name}: no {onnx_path}; export it first (python -m export onnx) or pass --onnx DIR")
        results[name], _ = build_engine(
            onnx_path, spec, graph_dims(onnx_dir), settings, layout.version_dir(out_repository, name), timing_cache=timing_cache
        )
    return results


def default_timing_cache() -> Path:
    kind = "tensorrt_rtx" if using_tensorrt_rtx() else "tensorrt"
    return layout.REPO_ROOT / "build" / "timing-cache" / f"{kind}-{trt_module().__version__}.cache"


def default_engine_repository() -> Path:
    """TensorRT plans go where the production configs load them; TensorRT-RTX engines, which
    Triton's tensorrt backend cannot load, go to a directory of their own."""
    return layout.REPO_ROOT / "build" / "engines-rtx" if using_tensorrt_rtx() else layout.DEFAULT_REPOSITORY
