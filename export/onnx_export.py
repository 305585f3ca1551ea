"""Export the networks to ONNX and check each graph's interface against `contract/networks.py`.

TorchScript exporter (`dynamo=False`), opset 17: its fp16 graphs load in ONNX Runtime and parse in
TensorRT; the dynamo exporter's fp16 graph did not load here (type clash).

One network at a time (`STAGES`): each loads only the pipeline components its graph needs, and
releases them before the next, so a full-size export holds the UNet alone at its peak. Everything
is written into a staging directory inside the repository and moved into place only once every
graph is written and checked: a failed export leaves the repository as it was. The configs of the
models the exported tensors pass through are then set to the exported dtype (contract/configs.py).
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo

from contract import layout, networks
from contract.configs import ONNX_ELEMENT_TYPES
from contract.loras import LORA_GRAPHS, SITES_FILE
from contract.networks import ModelDims, NetworkSpec
from contract.recipes import SCHEDULERS, Recipe, custom_recipe, with_refiner

from .modules import build_module
from .progress import log, step
from .quantize import (QUANTIZED_OPSET, Precisions, count_qdq, encode_prompts, float_latents, fp8_as_int8_scales,
                       quantize_unet, quantize_vae_decoder, retype_fp8_zero_points)
from .sources import ExportError, LoadedPipeline, Sources, check_writable, load_pipeline, model_dims

OPSET = 17
# Protobuf cannot serialize a message of 2 GiB or more; stay a margin below it.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2

COMPUTE_DTYPES = {"fp16": "FP16", "fp32": "FP32"}
_ONNX_TYPES = {triton: getattr(onnx.TensorProto, name) for triton, name in ONNX_ELEMENT_TYPES.items()}
# Shapes the exporter traces with. Any multiple of 8 in latent space works: the graphs keep
# batch/height/width dynamic; these only need to avoid size-specific branches (none at these sizes).
# Depth sizes of odd patch counts (9 x 13): Depth Anything's DPT neck resizes odd grids where even ones pass
# through, and the trace keeps the branch it saw.
TRACE_SIZES = {"batch": 2, "latent_height": 16, "latent_width": 24, "lora_rank": 3, "control_modes": 2, "depth_height": 126,
               "depth_width": 182}
# LoRA weights of random inputs: small, as trained LoRAs' are, so that hundreds of sites keep the
# activations (and fp16) finite.
_LORA_INPUT_STD = 0.02


def example_inputs(
    spec: NetworkSpec, dims: ModelDims, compute_dtype: str, *, batch: int, latent_height: int = 16,
    latent_width: int = 16, lora_rank: int = 2, control_modes: int = 2, seed: int = 0, device: str = "cpu",
    **depth_sizes: int,
) -> dict[str, torch.Tensor]:
    """Random inputs of the right names, dtypes and shapes (token ids from CLIP's 256 byte tokens;
    LoRA weights of rank `lora_rank` and image tokens and scales, zero for the last sample: one without LoRAs
    or image prompt; a union ControlNet's
    `control_modes` slots, with several rows the last row's last one empty, its rows one request; the
    depth estimator's depth_height and depth_width, by default the image's rounded up to 14)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for tensor in spec.inputs:
        shape = tensor.shape(dims, batch=batch, latent_height=latent_height, latent_width=latent_width, lora_rank=lora_rank,
                             control_modes=control_modes, **depth_sizes)
        dtype = tensor.resolved_dtype(compute_dtype)
        if tensor.name == "control_modes":  # the first types, one per slot
            value = torch.arange(shape[1]).expand(shape).clone()
            if shape[0] > 1 and shape[1] > 1:
                value[-1, -1] = -1
        elif tensor.name == "control_groups":
            value = torch.zeros(shape, dtype=torch.int64)
        elif tensor.name == "control_mode_scales":
            value = 0.5 + torch.rand(shape, generator=generator)
        elif tensor.name in ("lora_down", "lora_up", "ip_tokens", "ip_layer_scales"):  # the last row: one without
            value = torch.rand(shape, generator=generator) if tensor.name == "ip_layer_scales" else torch.randn(shape, generator=generator)
            value = value * _LORA_INPUT_STD if tensor.name.startswith("lora") else value
            if batch > 1:
                value[-1] = 0
        elif dtype in ("INT32", "UINT8"):  # token ids; pixels
            value = torch.randint(0, 256, shape, generator=generator, dtype=torch.int32)
        elif tensor.name == "timestep":
            value = torch.randint(0, 1000, shape, generator=generator).float()
        elif tensor.name == "time_ids":  # SDXL's sizes; the refiner's with an aesthetic score last
            size = torch.tensor([latent_height, latent_width] * 3, dtype=torch.float32) * dims.vae_scale_factor
            value = size[:shape[1]].expand(shape).clone()
            if shape[1] == networks.REFINER_TIME_IDS_DIM:
                value[:, -1] = 6.0
        else:
            value = torch.randn(shape, generator=generator)
        inputs[tensor.name] = value.to(device=device, dtype=getattr(torch, np.dtype(tensor.numpy_dtype(compute_dtype)).name))
    return inputs


def check_graph_io(model: onnx.ModelProto, spec: NetworkSpec, dims: ModelDims, compute_dtype: str) -> None:
    """The graph's inputs and outputs are the spec's: names, order, element types, ranks, fixed dims."""
    problems = []
    for kind, actual, expected in (("input", model.graph.input, spec.inputs), ("output", model.graph.output, spec.outputs)):
        names = [v.name for v in actual]
        if names != [t.name for t in expected]:
            problems.append(f"{kind}s are {names}, expected {[t.name for t in expected]}")
            continue
        for value, tensor in zip(actual, expected):
            ttype = value.type.tensor_type
            want_type = _ONNX_TYPES[tensor.resolved_dtype(compute_dtype)]
            if ttype.elem_type != want_type:
                problems.append(
                    f"{tensor.name}: element type {onnx.TensorProto.DataType.Name(ttype.elem_type)}, "
                    f"expected {onnx.TensorProto.DataType.Name(want_type)}"
                )
            got = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
            want = tensor.static_dims(dims)
            if got != want:
                problems.append(f"{tensor.name}: dims {list(got)}, expected {list(want)} (-1: dynamic)")
    if problems:
        raise ExportError(f"{spec.name}: exported graph does not match its spec: " + "; ".join(problems))


def declare_output_dims(model: onnx.ModelProto, spec: NetworkSpec, dims: ModelDims) -> None:
    """Name the outputs' dims as the spec does; the tracer leaves some as anonymous symbols."""
    for value, tensor in zip(model.graph.output, spec.outputs):
        shape = value.type.tensor_type.shape
        if len(shape.dim) != len(tensor.dims):
            continue  # check_graph_io reports it
        for dim, want in zip(shape.dim, tensor.dims):
            if want in networks.DYNAMIC_DIMS:
                dim.dim_param = want
            else:
                dim.dim_value = want if isinstance(want, int) else getattr(dims, want)


def _directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# Tensors of 1 MB and more start at a multiple of 64 KiB in the data file (onnx's own alignment
# rule), so runtimes can map them from the file.
_ALIGN_THRESHOLD, _ALIGNMENT = 1024**2, 64 * 1024


def _gather_external_data(model: onnx.ModelProto, source_dir: Path, data_path: Path) -> None:
    """Move every external tensor of `model` (one file each, as the exporter writes a graph over
    2 GB) into the one file `data_path`, streaming: no weight is held in memory."""
    with open(data_path, "wb") as out:
        for tensor in _external_tensors(model):
            info = ExternalDataInfo(tensor)
            source_path = source_dir / info.location
            start = info.offset or 0
            remaining = info.length if info.length is not None else source_path.stat().st_size - start
            if remaining >= _ALIGN_THRESHOLD:
                out.seek(-out.tell() % _ALIGNMENT, 1)
            offset = out.tell()
            with open(source_path, "rb") as source:
                source.seek(start)
                length = 0
                while length < remaining:
                    chunk = source.read(min(16 * 1024**2, remaining - length))
                    if not chunk:
                        raise ExportError(f"internal: {source_path} ends after {length} of {remaining} bytes")
                    out.write(chunk)
                    length += len(chunk)
            _point_to(tensor, layout.ONNX_DATA_FILE, offset, length)


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Set where an external tensor's bytes are (onnx's set_external_data wants them in memory)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def save_onnx(model: onnx.ModelProto, traced_dir: Path, path: Path, size_bytes: int, external_data_threshold: int) -> None:
    """One file, or graph + one `model.onnx.data` file when the weights are over the threshold."""
    if _external_tensors(model):  # the exporter wrote the weights beside the graph: gather them
        _gather_external_data(model, traced_dir, path.parent / layout.ONNX_DATA_FILE)
        onnx.save_model(model, str(path))
        return
    if size_bytes > external_data_threshold:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=layout.ONNX_DATA_FILE, size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def export_network(
    module: torch.nn.Module, spec: NetworkSpec, dims: ModelDims, dtype: str, out_dir: Path, *,
    device: str = "cpu", external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, precision: str | None = None,
) -> Path:
    """Export `module` to `out_dir/model.onnx` (+ external data), checked, replacing what was there.
    `precision`: fp8 or int8 when the module carries calibrated quantizers (export/quantize.py): opset
    19, and FP8's zero points retyped."""
    compute_dtype = COMPUTE_DTYPES[dtype]
    opset = QUANTIZED_OPSET if precision else OPSET
    if precision == "fp8":
        fp8_as_int8_scales(module)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = tuple(example_inputs(spec, dims, compute_dtype, device=device, **TRACE_SIZES).values())
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        traced_dir, final_dir = Path(tmp, "traced"), Path(tmp, "final")
        traced_dir.mkdir()
        final_dir.mkdir()
        with step(f"{spec.name}: tracing to ONNX ({dtype}{', ' + precision + ' Q/DQ' if precision else ''}, opset {opset})"), \
                torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on fixed-size checks
            torch.onnx.export(
                module, args, str(traced_dir / layout.ONNX_FILE), dynamo=False, opset_version=opset,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
            )
        size = _directory_size(traced_dir)
        # Without its external weights: a full-size graph's structure is a few MB, its weights GBs.
        model = onnx.load(str(traced_dir / layout.ONNX_FILE), load_external_data=False)
        declare_output_dims(model, spec, dims)
        check_graph_io(model, spec, dims, compute_dtype)
        if precision == "fp8":
            log(f"{spec.name}: {retype_fp8_zero_points(model)} Q/DQ nodes retyped to FLOAT8E4M3FN")
        if precision:
            log(f"{spec.name}: Q/DQ nodes {count_qdq(model)}")
        with step(f"{spec.name}: writing {layout.ONNX_FILE}" + (" + " + layout.ONNX_DATA_FILE if size > external_data_threshold else "")):
            save_onnx(model, traced_dir, final_dir / layout.ONNX_FILE, size, external_data_threshold)
        del model
        shutil.rmtree(traced_dir)
        onnx.checker.check_model(str(final_dir / layout.ONNX_FILE))
        _publish(final_dir, out_dir)
    external = f" + {layout.ONNX_DATA_FILE}" if (out_dir / layout.ONNX_DATA_FILE).exists() else ""
    log(f"{spec.name}: {layout.ONNX_FILE}{external} checked, {size / 1e6:.1f} MB")
    return out_dir / layout.ONNX_FILE


def _publish(staged: Path, out_dir: Path) -> None:
    """Move the checked files into place; drop a stale external-data file the new graph does not use."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / layout.ONNX_DATA_FILE
    if stale.exists() and not (staged / layout.ONNX_DATA_FILE).exists():
        stale.unlink()
    for f in staged.iterdir():
        f.replace(out_dir / f.name)


def recipe_scheduler(recipe: Recipe, pipeline_scheduler_config):
    """The recipe's diffusers scheduler, built from the pipeline's own scheduler config as the model
    cards do (`Class.from_config(pipe.scheduler.config, timestep_spacing="trailing")`); the model's
    own (kind `model`): the config's class, unchanged, if the loop runs it."""
    import diffusers

    from contract.recipes import scheduler_kind

    kind = SCHEDULERS[recipe.scheduler]
    class_name = kind.class_name or pipeline_scheduler_config.get("_class_name", "")
    try:
        scheduler_kind(class_name)
    except ValueError as error:
        raise ExportError(f"--scheduler {recipe.scheduler}: the model's {error}; choose one with --scheduler") from None
    return getattr(diffusers, class_name).from_config(pipeline_scheduler_config, **kind.overrides)


def write_serving_files(pipe, repository: Path, recipe: Recipe) -> None:
    """Tokenizers, the recipe's scheduler config and the recipe, where the tokenizer and scheduler
    models read them."""
    for which in layout.TOKENIZER_DIRS:
        getattr(pipe, which).save_pretrained(layout.tokenizer_dir(repository, which))
    scheduler_dir = layout.scheduler_config_path(repository).parent
    recipe_scheduler(recipe, pipe.scheduler.config).save_config(scheduler_dir)
    (scheduler_dir / layout.RECIPE_FILE).write_text(recipe.to_json())


def export_info(sources: Sources, spec: NetworkSpec, dims: ModelDims, dtype: str, quantization: dict | None = None) -> dict:
    """What the graph was exported from and with. `quantization`: its 8-bit precision, the layers kept
    in `dtype` and the calibration (export/quantize.py); absent for a float graph."""
    import diffusers
    import transformers

    return {
        "network": spec.name,
        "dtype": dtype,
        **({"precision": quantization["precision"], "quantization": quantization} if quantization else {"precision": dtype}),
        "opset": QUANTIZED_OPSET if quantization else OPSET,
        **sources.describe(),
        "dims": dims.as_dict(),
        "inputs": {t.name: [t.resolved_dtype(COMPUTE_DTYPES[dtype]), list(t.static_dims(dims))] for t in spec.inputs},
        "outputs": {t.name: [t.resolved_dtype(COMPUTE_DTYPES[dtype]), list(t.static_dims(dims))] for t in spec.outputs},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__},
    }


# The pipeline components each graph is traced from. The UNet goes first: a LoRA that does not fit
# shows there, before minutes of other work.
STAGES = {
    networks.UNET.name: ("unet",),
    networks.UNET_LORA.name: ("unet",),  # the same UNet, loaded once for its three graphs
    networks.UNET_CONTROL.name: ("unet",),
    networks.UNET_IP_NAME: ("unet",),  # with the IP-Adapter loaded against it (and kept for the image encoder)
    networks.IMAGE_ENCODER.name: ("unet",),
    networks.TEXT_ENCODER.name: ("text_encoder", "text_encoder_2"),
    networks.VAE_DECODER.name: ("vae",),
    networks.VAE_ENCODER.name: ("vae",),  # the same VAE, loaded once for both graphs
    networks.PREVIEW_DECODER.name: ("preview_vae",),
    networks.SAFETY_CHECKER.name: ("safety_checker",),
    networks.REFINER_UNET.name: ("refiner_unet",),
    networks.CONTROLNET.name: (),  # each ControlNet loaded on its own (load_controlnet), one graph each
    networks.DEPTH_ESTIMATOR.name: (),  # loaded on its own (export/depth.py), with its image processor
}


def export_controlnets(sources: Sources, preloaded, dims: ModelDims, dtype: str, device: str, staged: Path,
                       external_data_threshold: int) -> None:
    """Each ControlNet of `sources` to its own model: controlnet_NAME (the controlnet network's graph),
    or union_controlnet_NAME for a ControlNet-Union (the union_controlnet network's); from the pipeline
    in memory's `controlnets` ({name: ControlNetModel or ControlNetUnionModel}) when one is given."""
    from .modules import ControlNet, UnionControlNet
    from .sources import UNION_CLASS, _diffusers_errors_only, load_controlnet

    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    traced: dict[str, tuple[Path, bool]] = {}  # source -> (its graph's directory, whether it is a union)
    for name, path, preprocessor in sources.controlnets:
        model = None
        if path in traced:  # one ControlNet served under two names (two preprocessors): its graph once
            graph_dir, union = traced[path]
        else:
            if preloaded is not None:
                model = preloaded.controlnets[name]
            else:
                with step(f"loading ControlNet {name} from {path}"):
                    model = load_controlnet(path, dims, f"--controlnet {name}")
                with _diffusers_errors_only():  # its warning on casting is for running, not exporting
                    model.to(device=device, dtype=torch_dtype)
            union = type(model).__name__ == UNION_CLASS
        if union and preprocessor:
            raise ExportError(f"--controlnet-preprocessor {name}={preprocessor}: {name} is a ControlNet-Union; its modes "
                              "bring their own preprocessors (docs/controlnet.md)")
        out_dir = layout.version_dir(staged, networks.controlnet_model(name, union))
        if model is None:
            _copy_graph(graph_dir, out_dir, name, preprocessor, path)
            continue
        spec, module = (networks.UNION_CONTROLNET, UnionControlNet(model)) if union else (networks.CONTROLNET, ControlNet(model))
        export_network(module.eval(), spec, dims, dtype, out_dir, device=device, external_data_threshold=external_data_threshold)
        described = {"name": name, "source": path, "preprocessor": preprocessor,
                     **({"control_types": model.config.num_control_type} if union else {})}
        (out_dir / layout.EXPORT_INFO_FILE).write_text(json.dumps({**export_info(sources, spec, dims, dtype), "controlnet": described},
                                                                  indent=2) + "\n")
        traced[path] = (out_dir, union)
        del model, module
        gc.collect()


def _copy_graph(graph_dir: Path, out_dir: Path, name: str, preprocessor: str | None, path: str) -> None:
    """A ControlNet model of the same source as `graph_dir`'s: its graph copied, its own name and
    preprocessor in its export.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in (layout.ONNX_FILE, layout.ONNX_DATA_FILE):
        if (graph_dir / file).exists():
            shutil.copy2(graph_dir / file, out_dir / file)
    info = json.loads((graph_dir / layout.EXPORT_INFO_FILE).read_text())
    info["controlnet"] = {**info["controlnet"], "name": name, "preprocessor": preprocessor}
    (out_dir / layout.EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log(f"{out_dir.parent.name}: the graph of {graph_dir.parent.name} (the same source, {path}), copied")


def export_depth_estimator(sources: Sources, preloaded, dims: ModelDims, dtype: str, device: str, staged: Path) -> None:
    """The depth estimator of `sources` (from the pipeline in memory's `depth_estimator` and
    `depth_processor` when one is given) and its image processor's config beside the graph."""
    from .depth import load_depth_estimator
    from .modules import DepthEstimator

    if preloaded is not None:
        model, processor = preloaded.depth_estimator, preloaded.depth_processor
    else:
        with step(f"loading depth estimator {sources.depth_estimator}"):
            model, processor = load_depth_estimator(sources.depth_estimator)
        model.to(device=device, dtype={"fp16": torch.float16, "fp32": torch.float32}[dtype])
    spec, out_dir = networks.DEPTH_ESTIMATOR, layout.version_dir(staged, networks.DEPTH_ESTIMATOR.name)
    export_network(DepthEstimator(model).eval(), spec, dims, dtype, out_dir, device=device)
    processor.to_json_file(str(out_dir / layout.DEPTH_PREPROCESSOR_FILE))
    info = {**export_info(sources, spec, dims, dtype), "depth_estimator": {"source": sources.depth_estimator,
                                                                          "class": type(model).__name__}}
    (out_dir / layout.EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def with_ip_adapter(pipe, sources: Sources, dtype: str, device: str):
    """`pipe` with the IP-Adapter of `sources` (`ip_adapter`, fitted to its UNet) and its image encoder
    (`image_encoder`), in the export's dtype; a pipeline that has them (tests attach them) as it is."""
    from .ip_adapter import load_image_encoder, load_ip_adapter

    if getattr(pipe, "ip_adapter", None) is None:
        with step(f"loading IP-Adapter {sources.ip_adapter} and image encoder {sources.image_encoder}"):
            adapter = load_ip_adapter(sources.ip_adapter, pipe.unet)
            encoder = load_image_encoder(sources.image_encoder, adapter)
        torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
        pipe.ip_adapter, pipe.image_encoder = adapter.to(device=device, dtype=torch_dtype), encoder.to(device=device, dtype=torch_dtype)
    return pipe


def write_ip_adapter_files(pipe, sources: Sources, out_dir: Path) -> None:
    """Beside the image encoder's graph, what the loops read (serving/ip_adapters.py): the adapter's kind,
    layers and layer settings (contract/ip_adapters.py), and the CLIP image processor diffusers' load_ip_adapter
    uses with it."""
    from contract.ip_adapters import layer_masks

    from .ip_adapter import image_processor_config

    adapter = pipe.ip_adapter
    described = {"source": sources.ip_adapter, "image_encoder": sources.image_encoder, "kind": adapter.kind,
                 "tokens": adapter.tokens, "layers": adapter.names, "layer_settings": layer_masks(adapter.names)}
    (out_dir / layout.IP_ADAPTER_FILE).write_text(json.dumps(described, indent=2) + "\n")
    (out_dir / layout.IP_PREPROCESSOR_FILE).write_text(
        json.dumps(image_processor_config(pipe.image_encoder.config.image_size), indent=2) + "\n")


def write_safety_checker_files(pipe, out_dir: Path) -> None:
    """Beside the checker's graph, what its scoring and preprocessing read (serving/safety.py): the
    concepts' thresholds as diffusers reads them (`.item()` of the fp32 weights: Python floats) and
    the image processor's config."""
    from contract.layout import SAFETY_PREPROCESSOR_FILE, SAFETY_THRESHOLDS_FILE

    checker = pipe.safety_checker
    thresholds = {"concept": [w.item() for w in checker.concept_embeds_weights.float()],
                  "special_care": [w.item() for w in checker.special_care_embeds_weights.float()]}
    (out_dir / SAFETY_THRESHOLDS_FILE).write_text(json.dumps(thresholds, indent=2) + "\n")
    pipe.feature_extractor.to_json_file(out_dir / SAFETY_PREPROCESSOR_FILE)


class Calibrating:
    """The 8-bit networks of one export (export/quantize.py). The UNet is quantized when its stage is
    reached, calibrated on the recipe's own loop; the VAE decoder on the latents those runs end with
    (the float UNet's, when the UNet stays float). A loaded stage's networks are quantized in place
    (a full-size UNet is not copied); a pipeline given in memory (tests reuse one) is left as it was:
    copies are quantized."""

    UNETS = networks.UNET_GRAPHS

    def __init__(self, precisions: Precisions, recipe: Recipe, sources: Sources, dtype: str, device: str, preloaded):
        self.precisions, self.recipe, self.sources = precisions, recipe, sources
        self.dtype, self.device, self.preloaded = dtype, device, preloaded
        self.calibration = precisions.calibration
        self.reports: dict[str, dict] = {}
        self.latents = None
        self._embeddings = None
        self._unet = None

    def embeddings(self):
        """The prompts encoded once, by the text encoders the export serves (LoRAs fused), in fp32."""
        if self._embeddings is None:
            pipe = self.preloaded if self.preloaded is not None else load_pipeline(
                self.sources, "fp32", self.device, components=("text_encoder", "text_encoder_2")).pipe
            with step(f"calibration: encoding {len(self.calibration.prompts)} prompts ({self.calibration.source})"):
                self._embeddings = encode_prompts(pipe, self.calibration)
        return self._embeddings

    def components(self, name: str, pipe):
        """What build_module builds `name` from: the pipeline, or its quantized UNet or VAE."""
        if name not in self.UNETS:
            self._unet = None  # the UNet stage is over: its network goes with the stage
        if name in self.UNETS and (self.precisions.quantizes_unet or self.precisions.quantizes_vae):
            return SimpleNamespace(unet=self._unet_stage(pipe), ip_adapter=getattr(pipe, "ip_adapter", None))
        if name == networks.VAE_DECODER.name and self.precisions.quantizes_vae:
            return SimpleNamespace(vae=self._vae_stage(pipe))
        return pipe

    def _unet_stage(self, pipe):
        if self._unet is None:
            scheduler = recipe_scheduler(self.recipe, pipe.scheduler.config)
            if self.precisions.quantizes_unet:
                unet = copy.deepcopy(pipe.unet) if self.preloaded is not None else pipe.unet
                report, self.latents = quantize_unet(unet, scheduler, self.embeddings(), self.calibration, self.precisions.unet)
                self.reports.update({name: report.as_dict() for name in self.UNETS})
            else:
                unet = pipe.unet
                if self.latents is None:
                    self.latents = float_latents(unet, scheduler, self.embeddings(), self.calibration)
            self._unet = unet
        return self._unet

    def _vae_stage(self, pipe):
        if self.latents is None:  # no UNet stage in this export: the recipe's float loop, for its latents
            stage = self.preloaded if self.preloaded is not None else load_pipeline(
                self.sources, self.dtype, self.device, components=("unet",)).pipe
            self.latents = float_latents(stage.unet, recipe_scheduler(self.recipe, stage.scheduler.config),
                                         self.embeddings(), self.calibration)
            del stage
            gc.collect()
        vae = copy.deepcopy(pipe.vae) if self.preloaded is not None else pipe.vae
        decoder = build_module(networks.VAE_DECODER.name, SimpleNamespace(vae=vae))
        report = quantize_vae_decoder(vae, decoder, self.latents, self.precisions.vae_decoder, self.calibration)
        self.reports[networks.VAE_DECODER.name] = report.as_dict()
        return vae


@contextmanager
def _staging_area(repository: Path):
    """A directory inside the repository (same filesystem: moving out of it is a rename)."""
    staged = Path(tempfile.mkdtemp(dir=repository, prefix=".export-"))
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _publish_repository(staged: Path, repository: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if name == networks.CONTROLNET.name:  # the ControlNets' own models; those of an earlier export go
            for model in layout.controlnet_models(repository):
                shutil.rmtree(repository / model)
            for model in layout.controlnet_models(staged):
                _publish(layout.version_dir(staged, model), layout.version_dir(repository, model))
            continue
        _publish(layout.version_dir(staged, name), layout.version_dir(repository, name))
    for which in layout.TOKENIZER_DIRS:
        target = layout.tokenizer_dir(repository, which)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        layout.tokenizer_dir(staged, which).replace(target)
    target = layout.scheduler_config_path(repository)
    target.parent.mkdir(parents=True, exist_ok=True)
    layout.scheduler_config_path(staged).replace(target)
    (layout.scheduler_config_path(staged).parent / layout.RECIPE_FILE).replace(target.parent / layout.RECIPE_FILE)


@contextmanager
def _collecting_only_new_objects():
    """The export's gc.collect() calls (between networks and stages: cycles the tracer leaves must go before
    the next network is traced) walk only the objects made since it began: what the caller held before is
    frozen meanwhile (gc.freeze), so each call costs milliseconds, not a walk of every object in a process
    that holds several pipelines (0.3 s a call on the tests' heap, about 10% of an export's time there)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def export_pipeline(
    source: Sources | LoadedPipeline, repository: Path, dtype: str, *, device: str = "cpu",
    names: tuple[str, ...] | None = None, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    recipe: Recipe | None = None, precisions: Precisions | None = None,
) -> dict[str, Path]:
    """Export the named networks and the serving files into a model repository, and set the configs
    of the models their tensors pass through to `dtype`, and the scheduler's to the recipe.

    `source`: what to load, one stage at a time (Sources), or a pipeline already in memory with
    every component (LoadedPipeline: tests, which reuse one pipeline for many exports).
    `recipe`: the scheduler and request defaults to serve with (default: LCM, as a custom recipe of
    these sources). `names`: the networks to export (default: every one the recipe serves; the refiner's
    only with a refiner, and a repository whose recipe has none keeps no refiner_unet model).
    `precisions`: an 8-bit UNet and/or VAE decoder, calibrated on the recipe (default: all in `dtype`).
    """
    repository = Path(repository)
    check_writable(repository)
    sources = source.sources if isinstance(source, LoadedPipeline) else source
    if recipe is None:
        recipe = with_refiner(custom_recipe(sources.model, "lcm", tuple(str(lora) for lora in sources.loras), sources.unet,
                                            sources.vae), sources.refiner)
    if recipe.refiner != sources.refiner:
        raise ValueError(f"recipe {recipe.name} has refiner {recipe.refiner!r}, the sources {sources.refiner!r}")
    if names is None:
        names = networks.served_networks(recipe.refiner is not None, bool(sources.controlnets), sources.depth_estimator is not None,
                                         sources.ip_adapter is not None)
    preloaded = source.pipe if isinstance(source, LoadedPipeline) else None
    dims = ModelDims.from_pipeline(preloaded) if preloaded is not None else model_dims(sources)
    if sources.ip_adapter is not None and preloaded is None:  # its tokens, read (and its file checked) before any work
        from .ip_adapter import read_state_dict

        projection = read_state_dict(sources.ip_adapter)["image_proj"]
        dims = replace(dims, ip_tokens=4 if "proj.weight" in projection else int(projection["latents"].shape[1]))
    ordered = [name for name in STAGES if name in names]
    precisions = precisions or Precisions(dtype, dtype)
    calibrating = Calibrating(precisions, recipe, sources, dtype, device, preloaded) if precisions.quantizes_any else None
    stage, loaded_for = None, None
    with _collecting_only_new_objects(), _staging_area(repository) as staged:
        for index, name in enumerate(ordered, 1):
            spec = networks.NETWORKS[name]
            log(f"stage {index}/{len(ordered) + 1}: {name} (from {', '.join(STAGES[name]) or 'its own source'})")
            if name == networks.CONTROLNET.name:
                stage = None
                gc.collect()
                export_controlnets(sources, preloaded, dims, dtype, device, staged, external_data_threshold)
                continue
            if name == networks.DEPTH_ESTIMATOR.name:
                export_depth_estimator(sources, preloaded, dims, dtype, device, staged)
                continue
            if preloaded is not None:
                stage = source
            elif loaded_for != STAGES[name]:  # unet, unet_lora and unet_control, the VAE's decoder and encoder: one load each
                stage = None
                gc.collect()  # the previous stage's networks go before this one loads its own
                stage, loaded_for = load_pipeline(sources, dtype, device, components=STAGES[name]), STAGES[name]
            if name in networks.IP_ADAPTER_NETWORKS:
                with_ip_adapter(stage.pipe, sources, dtype, device)
            components = calibrating.components(name, stage.pipe) if calibrating else stage.pipe
            module = build_module(name, components, getattr(torch, {"fp16": "float16", "fp32": "float32"}[dtype]))
            out_dir = layout.version_dir(staged, name)
            precision = precisions.of(name)
            export_network(module, spec, dims, dtype, out_dir, device=device, external_data_threshold=external_data_threshold,
                           precision=precision)
            report = calibrating.reports.get(name) if calibrating and precision else None
            (out_dir / layout.EXPORT_INFO_FILE).write_text(json.dumps(export_info(sources, spec, dims, dtype, report), indent=2) + "\n")
            if name in LORA_GRAPHS.values():  # the layers a LoRA may adapt, and the architecture: what `lora add` checks against
                (out_dir / SITES_FILE).write_text(module.lora_sites.to_json())
            if name == networks.SAFETY_CHECKER.name:
                write_safety_checker_files(stage.pipe, out_dir)
            if name == networks.IMAGE_ENCODER.name:
                write_ip_adapter_files(stage.pipe, sources, out_dir)
            del module
            gc.collect()
        stage = None
        log(f"stage {len(ordered) + 1}/{len(ordered) + 1}: serving files (tokenizers, scheduler config)")
        serving = source if preloaded is not None else load_pipeline(sources, dtype, device, components=())
        write_serving_files(serving.pipe, staged, recipe)
        _publish_repository(staged, repository, tuple(ordered))
    log(f"graphs, tokenizers and {layout.SCHEDULER_CONFIG_FILE} ({layout.scheduler_class(repository)}, "
        f"recipe {recipe.name}) written under {repository}")
    from contract import configs  # reads Triton's config schema (tritonclient): only where configs are written

    try:
        changed = configs.follow_exported_graphs(repository, layout.TEMPLATES)
    except configs.ConfigError as error:
        raise ExportError(str(error)) from None
    # What this export does not serve: the templates' copies without a graph, and what an earlier export
    # left that does not fit this one (an export that writes the UNet writes the model anew).
    unserved = [networks.REFINER_UNET.name] if recipe.refiner is None else []
    if not sources.controlnets and networks.UNET.name in names:
        unserved += [networks.UNET_CONTROL.name, *layout.controlnet_models(repository)]
    if sources.depth_estimator is None and networks.UNET.name in names:
        unserved.append(networks.DEPTH_ESTIMATOR.name)
    if sources.ip_adapter is None and networks.UNET.name in names:
        unserved += list(networks.IP_ADAPTER_NETWORKS)
    unserved += [name for name in (networks.UNET_CONTROL.name, networks.DEPTH_ESTIMATOR.name, *networks.IP_ADAPTER_NETWORKS)
                 if not layout.onnx_path(repository, name).exists()]
    for model in unserved:
        shutil.rmtree(repository / model, ignore_errors=True)
    changed = [path for path in changed if path.exists()]
    if changed:
        log(f"configs set to the export ({dtype}; text {dims.text_dim}, pooled {dims.pooled_dim} wide): "
            + ", ".join(str(p.relative_to(repository)) for p in changed))
    try:
        changed = configs.follow_recipe(repository, recipe)
    except configs.ConfigError as error:
        raise ExportError(str(error)) from None
    if changed:
        log(f"scheduler, denoiser, sdxl_stream and tokenizer configs set to recipe {recipe.name} (steps {recipe.min_steps}-{recipe.max_steps}, default "
            f"{recipe.default_steps}; guidance {recipe.default_guidance:g})")
    models = [model for name in ordered
              for model in (layout.controlnet_models(repository) if name == networks.CONTROLNET.name else [name])]
    return {model: layout.onnx_path(repository, model) for model in models}
