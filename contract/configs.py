"""Read the repository's config.pbtxt files (Triton's own protobuf schema) and derive from them.

The engines' profiles (issue: TensorRT engines) and the tests take batch sizes and the endpoint's
limits from here, so the configs stay the one place these numbers are written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from . import layout
from .networks import COMPUTE, DYNAMIC_DIMS, ModelDims, TensorSpec

from .limits import Limits

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


def copy_repository_configs(source: Path, target: Path) -> None:
    """Copy the configs and model.py files of `source` into `target`, not the export outputs: to
    serve graphs exported elsewhere with this repository's models (tests, benchmarks)."""

    def export_outputs(directory, names):
        in_version_dir = os.path.basename(directory) == "1"
        return [n for n in names if n in EXPORT_OUTPUTS or (in_version_dir and n in layout.TOKENIZER_DIRS)]

    shutil.copytree(source, target, dirs_exist_ok=True, ignore=export_outputs)
