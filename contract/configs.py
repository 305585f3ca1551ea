"""Read the repository's config.pbtxt files (Triton's own protobuf schema), derive from them, and
make them follow the exported graphs.

The engines' profiles and the tests take batch sizes and the endpoint's limits from here, so the
configs stay the one place these numbers are written. The dtype is the exception that runs the
other way: it is a property of the export (`python -m export onnx --dtype`), recorded beside each
graph in export.json, and `follow_exported_graphs` writes it into the configs of every model the
exported tensors pass through (text_encoder, unet, vae_decoder and scheduler, both variants). The
configs in git (`model_repository/`, the templates) are the fp16 ones with SDXL's widths
(production's default); an export copies them into its output repository and changes the copy.
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
from .networks import (COMPUTE, CONTROLNET_MODEL_PREFIXES, DYNAMIC_DIMS, LOOP_MODELS, NETWORKS, RECIPE_MODELS, SCHEDULER, TOKENIZER,
                       ModelDims, TensorSpec, compute_tensors, model_tensors, network_of)



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


def expected_dims(tensor: TensorSpec, batched: bool, model: ModelDims) -> tuple[list[int], list[int] | None]:
    """(dims, reshape) a config must declare for a spec tensor of a model with dims `model`.

    batched: the model has max_batch_size > 0, so the leading `batch` dim is implicit.
    A tensor that is only [batch] is declared as dims [1] with reshape [] (Triton needs one dim).
    """
    dims = list(tensor.dims[1:] if batched and tensor.dims[:1] == ("batch",) else tensor.dims)
    resolved = []
    for d in dims:
        if d in DYNAMIC_DIMS:
            resolved.append(-1)
        else:
            resolved.append(d if isinstance(d, int) else getattr(model, d))
    if not resolved:
        return [1], []
    return resolved, None


# What `python -m export onnx` / `engines` write into a repository, as opposed to what git tracks.
EXPORT_OUTPUTS = {layout.ONNX_FILE, layout.ONNX_DATA_FILE, layout.ENGINE_FILE, layout.FINGERPRINT_FILE,
                  layout.EXPORT_INFO_FILE, layout.SCHEDULER_CONFIG_FILE, layout.RECIPE_FILE, "lora_sites.json", "__pycache__",
                  layout.SAFETY_THRESHOLDS_FILE, layout.SAFETY_PREPROCESSOR_FILE}


def copy_configs(source: Path, target: Path) -> None:
    """Copy the configs and model.py files of `source` into `target`, not the export outputs."""

    def export_outputs(directory, names):
        in_version_dir = os.path.basename(directory) == "1"
        return [n for n in names if n in EXPORT_OUTPUTS or (in_version_dir and n in layout.TOKENIZER_DIRS)]

    shutil.copytree(source, target, dirs_exist_ok=True, ignore=export_outputs)


# --- The export in the configs -------------------------------------------------------------------

EXPORT_DTYPES = {"fp16": "FP16", "fp32": "FP32"}  # --dtype -> Triton type name
PRODUCTION_DTYPE = "fp16"  # TensorRT on a GPU; the configs in git declare it, with SDXL's widths
# The CPU variant's default (make demo, make test, the CPU benchmarks): ONNX Runtime's CPU kernels
# are faster and leaner in fp32, measured in benchmarks/results/scale_cpu.md. The Makefile's DTYPE
# repeats it (a test checks that they agree).
CPU_DTYPE = "fp32"
EXPORTED_MODELS = (*NETWORKS, TOKENIZER, *LOOP_MODELS)  # the models whose configs carry what the export decided


def exported_models(repository: Path) -> tuple[str, ...]:
    """EXPORTED_MODELS and the repository's ControlNet models (controlnet_NAME)."""
    return (*EXPORTED_MODELS, *layout.controlnet_models(repository))


def instantiate_controlnets(repository: Path) -> list[str]:
    """Give each ControlNet model of `repository` (controlnet_NAME or union_controlnet_NAME, holding its
    graph) the configs and model.py of its network's template (`controlnet`, `union_controlnet`) copied
    there, its name set; the templates' own directories go (never served). Returns the ControlNet models."""
    repository = Path(repository)
    models = layout.controlnet_models(repository)
    for model in models:
        template = network_of(model).name
        if (repository / template).is_dir():
            copy_configs(repository / template, repository / model)
            for path in config_files(repository, model):
                text = path.read_text()
                _replace_if_changed(path, text, re.sub(rf'^name:\s*"{template}"', f'name: "{model}"', text, flags=re.M))
    for template in CONTROLNET_MODEL_PREFIXES:
        shutil.rmtree(repository / template, ignore_errors=True)
    return models
FIX_COMMAND = "python -m export configs --repository {repository}"

Interface = dict[str, tuple[str, list[int]]]  # tensor -> (Triton type without TYPE_, dims as the graph has them, -1: any)
# Triton type name -> the name of that element type in onnx.TensorProto
ONNX_ELEMENT_TYPES = {"FP16": "FLOAT16", "FP32": "FLOAT", "INT32": "INT32", "INT64": "INT64", "UINT8": "UINT8"}


def graph_interface(path: Path) -> Interface:
    """A graph's inputs and outputs, read without its weights (a full-size graph's structure is a
    few MB): what the export checks, the CPU variant's lazily loaded models check at load, and the
    full-size skeleton tests read."""
    import onnx  # here, not at the top: most importers of this module never read a graph

    types = {getattr(onnx.TensorProto, name): triton for triton, name in ONNX_ELEMENT_TYPES.items()}
    model = onnx.load(str(path), load_external_data=False)
    return {
        value.name: (types[value.type.tensor_type.elem_type],
                     [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim])
        for value in list(model.graph.input) + list(model.graph.output)
    }


class ConfigError(ValueError):
    """A config that cannot follow the exported graphs, or graphs that disagree with each other."""


def config_files(repository: Path, model: str) -> list[Path]:
    """Every variant of a model's config: config.pbtxt and configs/*.pbtxt."""
    directory = Path(repository) / model
    return [p for p in [directory / "config.pbtxt", *sorted((directory / "configs").glob("*.pbtxt"))] if p.exists()]


def _type_name(data_type: int) -> str:
    return model_config_pb2.DataType.Name(data_type)[len("TYPE_"):]


def declared_interface(config: model_config_pb2.ModelConfig) -> Interface:
    """What a config declares, shaped as the graph sees it: the batch dim first when the model
    batches (max_batch_size > 0), `reshape` applied."""
    batch = [-1] if config.max_batch_size > 0 else []
    return {
        entry.name: (_type_name(entry.data_type), batch + list(entry.reshape.shape if entry.HasField("reshape") else entry.dims))
        for entry in list(config.input) + list(config.output)
    }


def declared_interface_json(config: dict) -> Interface:
    """declared_interface for the JSON config Triton hands a Python model."""
    batch = [-1] if config.get("max_batch_size", 0) > 0 else []
    return {
        entry["name"]: (entry["data_type"][len("TYPE_"):],
                        batch + [int(d) for d in (entry["reshape"]["shape"] if "reshape" in entry else entry["dims"])])
        for entry in config.get("input", []) + config.get("output", [])
    }


def _dims_differ(declared: list[int], graph: list[int]) -> bool:
    return len(declared) != len(graph) or any(d != -1 and g != -1 and d != g for d, g in zip(declared, graph))


def interface_mismatches(config: model_config_pb2.ModelConfig, interface: Interface) -> list[str]:
    """Where a config disagrees with a graph's interface: a missing tensor, another type, or a dim
    both fix differently (-1 on either side accepts anything)."""
    problems = []
    for name, (declared_type, declared_dims) in declared_interface(config).items():
        if name not in interface:
            problems.append(f"{name}: not in the graph")
            continue
        graph_type, graph_dims = interface[name]
        if declared_type != graph_type:
            problems.append(f"{name}: config {declared_type}, graph {graph_type}")
        if _dims_differ(declared_dims, graph_dims):
            problems.append(f"{name}: config dims {declared_dims}, graph {graph_dims}")
    return problems


def _mismatch_message(model: str, tensor: str, graph: tuple[str, list[int]], declared: tuple[str, list[int]],
                      graph_file: str, config_file: str, repository) -> str:
    fix = f"make the configs follow the graphs with `{FIX_COMMAND.format(repository=repository)}`"
    if graph[0] != declared[0] and graph[0] in EXPORT_DTYPES.values() and tensor in compute_tensors(model):
        return (f"{model}: the graphs were exported in {graph[0].lower()} ({tensor} is {graph[0]} in {graph_file}), but "
                f"{config_file} declares TYPE_{declared[0]} for {tensor}; {fix} (or export again with --dtype {declared[0].lower()})")
    if graph[0] != declared[0]:
        return f"{model}: {tensor} is {graph[0]} in {graph_file}, but {config_file} declares TYPE_{declared[0]}; {fix}"
    return (f"{model}: {tensor} has dims {graph[1]} in {graph_file} (-1: dynamic), but {config_file} declares "
            f"{declared[1]} (batch first); {fix}")


def graph_mismatch(model: str, graph: dict[str, tuple[str, list[int], str]], declared: Interface, config_file: str,
                   repository) -> str | None:
    """The first tensor whose type or fixed dims in the graph (`graph`: name -> (type, dims, graph
    file)) differ from the config's, as one message naming the model, both sides and the fix."""
    for name, (graph_type, graph_dims, graph_file) in graph.items():
        if name not in declared:
            continue
        declared_type, declared_dims = declared[name]
        if graph_type != declared_type or _dims_differ(declared_dims, graph_dims):
            return _mismatch_message(model, name, (graph_type, graph_dims), declared[name], graph_file, config_file, repository)
    return None


def _export_info(repository: Path, network: str) -> dict | None:
    info = layout.version_dir(repository, network) / layout.EXPORT_INFO_FILE
    return json.loads(info.read_text()) if info.exists() else None


def exported_interface(repository: Path, model: str) -> dict[str, tuple[str, list[int], str]]:
    """{tensor: (Triton type, dims, graph file)} of a model's graph tensors as the export recorded
    them (export.json); for the scheduler, the graph tensors it passes on. Empty: nothing exported."""
    def recorded(network: str, kind: str) -> dict[str, tuple[str, list[int], str]]:
        info = _export_info(repository, network)
        graph_file = f"{network}/{layout.VERSION}/{layout.ONNX_FILE}"
        return {name: (dtype, list(dims), graph_file) for name, (dtype, dims) in info[kind].items()} if info else {}

    from .networks import TEXT_ENCODER, VAE_DECODER

    if model == TOKENIZER:
        passed = recorded(TEXT_ENCODER.name, "inputs")
    elif model in LOOP_MODELS:
        passed = {**recorded(TEXT_ENCODER.name, "outputs"), **recorded(VAE_DECODER.name, "inputs")}
    else:
        return {**recorded(model, "inputs"), **recorded(model, "outputs")}
    return {name: passed[name] for name in model_tensors(model) if name in passed}


def repository_export(repository: Path) -> tuple[str, ModelDims] | None:
    """(dtype, model dims) the repository's graphs were exported with; None: no graph. Graphs of
    different dtypes or models cannot be served together (the scheduler sits between them)."""
    found = {name: info for name in (*NETWORKS, *layout.controlnet_models(repository)) if (info := _export_info(repository, name))}
    if not found:
        return None
    dtypes = {info["dtype"] for info in found.values()}
    dims = {json.dumps(info["dims"], sort_keys=True) for info in found.values()}
    if len(dtypes) > 1 or len(dims) > 1:
        listing = ", ".join(f"{name} {info['dtype']} {info['dims']}" for name, info in found.items())
        raise ConfigError(f"{repository}: graphs of different exports ({listing}); export them together")
    info = next(iter(found.values()))
    return info["dtype"], ModelDims(**info["dims"])


def repository_dtype(repository: Path) -> str | None:
    exported = repository_export(repository)
    return exported[0] if exported else None


def set_exported_interface(path: Path, model: str, dtype: str, dims: ModelDims) -> bool:
    """Set, in one config file, the types of the export-dtype tensors to `dtype` and every spec
    tensor's dims to the exported model's, keeping the rest of the file (comments included).
    True when the file changed."""
    text = path.read_text()
    batched = text_format.Parse(text, model_config_pb2.ModelConfig()).max_batch_size > 0
    wanted = {}  # name -> (type, dims as written in the file, dims as the graph sees them)
    for name, tensor in model_tensors(model).items():
        dims_written, reshape = expected_dims(tensor, batched, dims)
        graph_dims = ([-1] if batched else []) + (reshape if reshape is not None else dims_written)
        wanted[name] = (tensor.resolved_dtype(EXPORT_DTYPES[dtype]), dims_written, graph_dims)
    updated = text
    for name, (want_type, dims_written, _) in wanted.items():
        entry = re.compile(rf'(name:\s*"{re.escape(name)}"\s+data_type:\s*)TYPE_\w+(\s+dims:\s*)\[[^\]]*\]')
        updated = entry.sub(lambda m: f"{m.group(1)}TYPE_{want_type}{m.group(2)}[ {', '.join(map(str, dims_written))} ]", updated)
    declared = declared_interface(text_format.Parse(updated, model_config_pb2.ModelConfig()))
    for name, (want_type, _, graph_dims) in wanted.items():
        if name in declared and declared[name] != (want_type, graph_dims):
            raise ConfigError(f"{path}: could not set {name} to TYPE_{want_type} {graph_dims} (found {declared[name]}); "
                              f'write each tensor as {{ name: "..." data_type: TYPE_... dims: [ ... ] }} on one line')
    return _replace_if_changed(path, text, updated)


def _replace_if_changed(path: Path, text: str, updated: str) -> bool:
    """Write `updated` over `path` (whose content is `text`) atomically, if it differs; True then."""
    if updated == text:
        return False
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(updated)
    os.replace(f.name, path)
    return True


def follow_exported_graphs(repository: Path, template: Path | None = None, dtype: str | None = None) -> list[Path]:
    """Make the configs of `repository` declare what its graphs were exported with: the dtype and
    the model's widths. `dtype` must agree with the graphs when there are any; without graphs it
    sets that dtype and SDXL's widths (what git holds, for dtype fp16). Returns the files changed.

    `template` (an export): its configs and model.py files are first copied over the repository's,
    so that what is served is always the templates of this checkout plus the export, never a copy
    left by an older one.
    """
    repository = Path(repository)
    if template is not None and Path(template).resolve() != repository.resolve():
        copy_configs(template, repository)
        instantiate_controlnets(repository)
    exported = repository_export(repository)
    if dtype is not None and exported is not None and dtype != exported[0]:
        raise ConfigError(f"{repository}: its graphs were exported in {exported[0]}; configs in {dtype} would not match "
                          f"them: export again with --dtype {dtype}, or remove the graphs first (make clean)")
    if exported is None and dtype is None:
        return []
    dtype, dims = exported if exported is not None else (dtype, ModelDims())
    return [path for model in exported_models(repository) for path in config_files(repository, model)
            if set_exported_interface(path, model, dtype, dims)]


def config_problems(repository: Path, variant: str = "production") -> list[str]:
    """What would make a model fail to load: a config whose tensors disagree with the types and
    dims its graph (or the graphs around it, for the scheduler) was exported with. One per model."""
    repository = Path(repository)
    problems = []
    for model in exported_models(repository):
        path = config_path(repository, model, variant)
        graph = exported_interface(repository, model)
        if not graph or not path.exists():
            continue
        declared = declared_interface(read_config(repository, model, variant))
        problem = graph_mismatch(model, graph, declared, str(path.relative_to(repository)), repository)
        if problem:
            problems.append(problem)
    return problems


# --- The recipe in the scheduler's configs -------------------------------------------------------

def _parameter_entry(key: str, value: str) -> str:
    return f'{{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}'


def set_parameters(path: Path, values: dict[str, str]) -> bool:
    """Set string parameters in one config file, keeping the rest of it (comments included):
    an existing key's value is replaced, a new key goes at the end of `parameters [ ... ]`.
    True when the file changed."""
    text = path.read_text()
    updated = text
    missing = []
    for key, value in values.items():
        entry = re.compile(rf'\{{\s*key:\s*"{re.escape(key)}"\s+value:\s*\{{\s*string_value:\s*"(?:[^"\\]|\\.)*"\s*\}}\s*\}}')
        if entry.search(updated):
            updated = entry.sub(lambda m: _parameter_entry(key, value), updated, count=1)
        else:
            missing.append(_parameter_entry(key, value))
    if missing:
        block = re.search(r"^parameters\s*\[(.*?)^\]", updated, re.S | re.M)
        if block is None:
            raise ConfigError(f"{path}: no `parameters [ ... ]` block (closing ] on its own line) to add the recipe to")
        body = block.group(1).rstrip()
        separator = "," if body.strip() and not body.endswith(",") else ""
        new_body = body + separator + "\n" + ",\n".join(f"  {entry}" for entry in missing) + "\n"
        updated = updated[:block.start(1)] + new_body + updated[block.end(1):]
    found = parameters(text_format.Parse(updated, model_config_pb2.ModelConfig()))
    wrong = {key: found.get(key) for key, value in values.items() if found.get(key) != value}
    if wrong:
        raise ConfigError(f"{path}: could not set parameters {wrong}")
    return _replace_if_changed(path, text, updated)


def follow_recipe(repository: Path, recipe) -> list[Path]:
    """Write `recipe` (contract.recipes.Recipe) into every variant of the configs of RECIPE_MODELS
    (scheduler, denoiser, sdxl_stream, tokenizer): its step range, defaults and what it was made from.
    Returns the files changed."""
    values = recipe.as_parameters()
    if not values["recipe_scheduler"]:  # the model's own: the class the export wrote
        values["recipe_scheduler"] = layout.scheduler_class(repository)
    return [path for model in RECIPE_MODELS for path in config_files(repository, model)
            if set_parameters(path, values)]


def recipe_file(repository: Path) -> Path:
    return layout.version_dir(repository, SCHEDULER) / layout.RECIPE_FILE
