"""Read the repository's config.pbtxt files (Triton's own protobuf schema), derive from them, and
make them follow the exported graphs.

The engines' profiles and the tests take batch sizes and the endpoint's limits from here, so the
configs stay the one place these numbers are written. The dtype is the exception that runs the
other way: it is a property of the export (`python -m export onnx --dtype`), recorded beside each
graph in export.json, and `follow_exported_graphs` writes it into the configs of every model the
exported tensors pass through (text_encoder, unet, vae_decoder and scheduler, both variants). The
configs in git are the fp16 ones (production's default); an fp32 export changes them in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from . import layout
from .limits import Limits
from .networks import COMPUTE, DYNAMIC_DIMS, NETWORKS, SCHEDULER, ModelDims, TensorSpec, compute_tensors

# Model dims the CPU configs leave as -1, so one config serves any exported SDXL-family model.
MODEL_WIDTH_DIMS = ("text_dim", "pooled_dim")


def config_path(repository: Path, model: str, variant: str = "production") -> Path:
    """`<model>/configs/<variant>.pbtxt` when it exists (Triton's --model-config-name), else config.pbtxt."""
    if variant != "production":
        path = Path(repository) / model / "configs" / f"{variant}.pbtxt"
        if path.exists():
            return path
    return Path(repository) / model / "config.pbtxt"


def read_config(repository: Path, model: str, variant: str = "production") -> model_config_pb2.ModelConfig:
    return text_format.Parse(config_path(repository, model, variant).read_text(), model_config_pb2.ModelConfig())


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def scheduler_limits(repository: Path, variant: str = "production") -> Limits:
    return Limits.from_parameters(parameters(read_config(repository, "scheduler", variant)))


def data_type(tensor: TensorSpec, compute_dtype: str = "FP16") -> str:
    """The TYPE_* name a config must use for a spec tensor (the configs serve fp16 graphs)."""
    dtype = compute_dtype if tensor.dtype == COMPUTE else tensor.dtype
    return "TYPE_" + dtype


def expected_dims(tensor: TensorSpec, batched: bool, model: ModelDims | None) -> tuple[list[int], list[int] | None]:
    """(dims, reshape) a config must declare for a spec tensor.

    batched: the model has max_batch_size > 0, so the leading `batch` dim is implicit. model: the
    model's dims, or None for the CPU configs' wildcards (MODEL_WIDTH_DIMS as -1).
    A tensor that is only [batch] is declared as dims [1] with reshape [] (Triton needs one dim).
    """
    dims = list(tensor.dims[1:] if batched and tensor.dims[:1] == ("batch",) else tensor.dims)
    resolved = []
    for d in dims:
        if d in DYNAMIC_DIMS or (model is None and d in MODEL_WIDTH_DIMS):
            resolved.append(-1)
        else:
            resolved.append(d if isinstance(d, int) else getattr(model or ModelDims(), d))
    if not resolved:
        return [1], []
    return resolved, None


# What `python -m export onnx` / `engines` write into a repository, as opposed to what git tracks.
EXPORT_OUTPUTS = {layout.ONNX_FILE, layout.ONNX_DATA_FILE, layout.ENGINE_FILE, layout.FINGERPRINT_FILE,
                  layout.EXPORT_INFO_FILE, layout.SCHEDULER_CONFIG_FILE, "__pycache__"}


def copy_repository_configs(source: Path, target: Path) -> list[Path]:
    """Copy the configs and model.py files of `source` into `target`, not the export outputs (to
    serve graphs exported elsewhere with this repository's models: tests, benchmarks), and make
    them follow the graphs already in `target`. Returns the configs set to another dtype."""
    _copy_configs(source, target)
    return follow_exported_graphs(target)


def _copy_configs(source: Path, target: Path) -> None:
    def export_outputs(directory, names):
        in_version_dir = os.path.basename(directory) == "1"
        return [n for n in names if n in EXPORT_OUTPUTS or (in_version_dir and n in layout.TOKENIZER_DIRS)]

    shutil.copytree(source, target, dirs_exist_ok=True, ignore=export_outputs)


# --- The export dtype in the configs -------------------------------------------------------------

EXPORT_DTYPES = {"fp16": "FP16", "fp32": "FP32"}  # --dtype -> Triton type name
PRODUCTION_DTYPE = "fp16"  # TensorRT on a GPU; the configs in git declare it
# The CPU variant's default (make demo, make test, the CPU benchmarks): ONNX Runtime's CPU kernels
# are faster in fp32, measured in benchmarks/results/dtype_cpu.md. The Makefile's DTYPE repeats it
# (a test checks that they agree).
CPU_DTYPE = "fp32"
DTYPE_MODELS = (*NETWORKS, SCHEDULER)  # the models whose configs carry the export dtype
FIX_COMMAND = "python -m export configs --repository {repository}"


class ConfigError(ValueError):
    """A config that cannot follow the exported graphs, or graphs that disagree with each other."""


def config_files(repository: Path, model: str) -> list[Path]:
    """Every variant of a model's config: config.pbtxt and configs/*.pbtxt."""
    directory = Path(repository) / model
    return [p for p in [directory / "config.pbtxt", *sorted((directory / "configs").glob("*.pbtxt"))] if p.exists()]


def declared_types(config: model_config_pb2.ModelConfig, names) -> dict[str, str]:
    """{tensor: Triton type name without TYPE_} of the named inputs and outputs a config declares."""
    entries = {t.name: t for t in list(config.input) + list(config.output)}
    return {name: model_config_pb2.DataType.Name(entries[name].data_type)[len("TYPE_"):] for name in names if name in entries}


def exported_dtype(repository: Path, network: str) -> str | None:
    """The --dtype (fp16, fp32) a network's graph was exported with, from its export.json; None: no graph."""
    info = layout.version_dir(repository, network) / layout.EXPORT_INFO_FILE
    return json.loads(info.read_text())["dtype"] if info.exists() else None


def repository_dtype(repository: Path) -> str | None:
    """The export dtype of the repository's graphs (None: none exported); graphs of different
    dtypes cannot be served together (the scheduler sits between them)."""
    found = {name: exported_dtype(repository, name) for name in NETWORKS}
    dtypes = set(filter(None, found.values()))
    if len(dtypes) > 1:
        listing = ", ".join(f"{name} {dtype}" for name, dtype in found.items() if dtype)
        raise ConfigError(f"{repository}: graphs of different dtypes ({listing}); export them all with one --dtype")
    return dtypes.pop() if dtypes else None


def set_compute_dtype(path: Path, model: str, dtype: str) -> bool:
    """Set the export-dtype tensors of one config file to `dtype` (fp16/fp32), keeping the rest of
    the file (comments included) as it is. True when the file changed."""
    wanted = EXPORT_DTYPES[dtype]
    text = path.read_text()
    updated = text
    for name in compute_tensors(model):
        pattern = re.compile(rf'(name:\s*"{re.escape(name)}"\s+data_type:\s*)TYPE_(?:FP16|FP32)\b')
        updated = pattern.sub(rf"\g<1>TYPE_{wanted}", updated)
    config = text_format.Parse(updated, model_config_pb2.ModelConfig())
    declared = declared_types(config, compute_tensors(model))
    wrong = {name: value for name, value in declared.items() if value != wanted}
    if wrong or len(declared) != len(compute_tensors(model)):
        raise ConfigError(f"{path}: could not set {', '.join(compute_tensors(model))} to TYPE_{wanted} (found {declared}); "
                          f'write each as {{ name: "..." data_type: TYPE_... }} on one line')
    if updated == text:
        return False
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(updated)
    os.replace(f.name, path)
    return True


def follow_exported_graphs(repository: Path, template: Path | None = None) -> list[Path]:
    """Make the configs of `repository` declare the dtype its graphs were exported in.

    A repository without configs (an export into a new directory) first gets a copy of
    `template`'s configs and model.py files, so that it can be served as it is. Returns the
    config files that changed.
    """
    repository = Path(repository)
    if template is not None and Path(template).resolve() != repository.resolve() and not config_files(repository, SCHEDULER):
        _copy_configs(template, repository)
    dtype = repository_dtype(repository)
    if dtype is None:
        return []
    return [path for model in DTYPE_MODELS for path in config_files(repository, model) if set_compute_dtype(path, model, dtype)]


def dtype_mismatch(model: str, graph_file: str, graph_dtype: str, tensor: str, config_file: str, declared: str, repository) -> str:
    """The one message for a graph and a config that disagree on the dtype."""
    exported = graph_dtype.lower()  # FP32 -> fp32, the --dtype it was exported with
    return (f"{model}: the graphs were exported in {exported} ({tensor} is {graph_dtype} in {graph_file}), but "
            f"{config_file} declares TYPE_{declared} for {tensor}; make the configs follow the graphs with "
            f"`{FIX_COMMAND.format(repository=repository)}` (or export again with --dtype {declared.lower()})")


def graph_mismatch(model: str, graph: dict[str, str], declared: dict[str, str], config_file: str, repository,
                   graph_files: dict[str, str]) -> str | None:
    """The first tensor whose type in the graph (`graph`: name -> Triton type name) differs from
    the config's (`declared`), as one message naming the model, both types and the fix; None: agree.
    `graph_files`: where each tensor's graph is, for the message."""
    for name, value in declared.items():
        actual = graph.get(name)
        if actual is None or actual == value:
            continue
        if name in compute_tensors(model) and actual in EXPORT_DTYPES.values():
            return dtype_mismatch(model, graph_files[name], actual, name, config_file, value, repository)
        return f"{model}: {graph_files[name]} has {name} as {actual}, but {config_file} declares TYPE_{value}"
    return None


def exported_tensor_types(repository: Path, model: str) -> dict[str, tuple[str, str]]:
    """{tensor: (Triton type, graph file)} of a model's graph tensors as the export recorded them
    (export.json); for the scheduler, the graph tensors it passes on. Empty: nothing exported."""
    def recorded(network: str, kind: str) -> dict[str, tuple[str, str]]:
        info = layout.version_dir(repository, network) / layout.EXPORT_INFO_FILE
        if not info.exists():
            return {}
        graph_file = f"{network}/{layout.VERSION}/{layout.ONNX_FILE}"
        return {name: (dtype, graph_file) for name, (dtype, _) in json.loads(info.read_text())[kind].items()}

    if model != SCHEDULER:
        return {**recorded(model, "inputs"), **recorded(model, "outputs")}
    from .networks import SCHEDULER_GRAPH_TENSORS, TEXT_ENCODER, VAE_DECODER

    passed = {**recorded(TEXT_ENCODER.name, "outputs"), **recorded(VAE_DECODER.name, "inputs")}
    return {name: passed[name] for name in SCHEDULER_GRAPH_TENSORS if name in passed}


def dtype_problems(repository: Path, variant: str = "production") -> list[str]:
    """What would make a model fail to load: a config whose tensors disagree with the types its
    graph (or the graphs around it, for the scheduler) was exported with. One message per model."""
    repository = Path(repository)
    problems = []
    for model in DTYPE_MODELS:
        path = config_path(repository, model, variant)
        graph = exported_tensor_types(repository, model)
        if not graph or not path.exists():
            continue
        declared = declared_types(read_config(repository, model, variant), graph)
        problem = graph_mismatch(model, {n: t for n, (t, _) in graph.items()}, declared, str(path.relative_to(repository)),
                                 repository, {n: f for n, (_, f) in graph.items()})
        if problem:
            problems.append(problem)
    return problems
