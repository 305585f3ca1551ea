"""Where exported files go in a Triton model repository (the default: `build/model_repository/`).

Two directories, never the same one:
- `model_repository/` (TEMPLATES, tracked): every model's config.pbtxt (production: fp16, SDXL's
  widths, TensorRT plans), configs/cpu.pbtxt (the CPU variant) and the thin model.py files. No
  command writes into it, so a clone stays as git has it whatever runs.
- `build/model_repository/` (DEFAULT_REPOSITORY, ignored): the servable repository. `python -m export
  onnx` copies the templates into it, writes the files below, and makes its configs follow the
  export (dtype, widths, recipe); `make serve`, the engine build and the client's tools use it.

    <repo>/text_encoder/1/model.onnx       (+ model.onnx.data when the graph is over 2 GB)
    <repo>/unet/1/model.onnx               (+ model.onnx.data)
    <repo>/vae_decoder/1/model.onnx
    <repo>/<network>/1/export.json         what the graph was exported from, and how
    <repo>/tokenizer/1/tokenizer/          CLIP ViT-L tokenizer files
    <repo>/tokenizer/1/tokenizer_2/        OpenCLIP bigG tokenizer files
    <repo>/scheduler/1/scheduler_config.json   the recipe's diffusers scheduler (class and config)
    <repo>/scheduler/1/recipe.json             the recipe (model, LoRAs, UNet, scheduler, steps, guidance)
    <repo>/safety_checker/1/thresholds.json, preprocessor_config.json   its scoring and preprocessing

Version directory `1` holds both the ONNX graph (served by the CPU variant through ONNX Runtime) and
the TensorRT plan built from it (`model.plan`, served by the production configs).
"""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = REPO_ROOT / "model_repository"  # the configs and model.py files git holds
DEFAULT_REPOSITORY = REPO_ROOT / "build" / "model_repository"  # what the export assembles and make serve serves
VERSION = "1"

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
EXPORT_INFO_FILE = "export.json"
ENGINE_FILE = "model.plan"  # where the production configs load the TensorRT plan
FINGERPRINT_FILE = "model.plan.json"  # what the plan was built from (python -m export engines)
TOKENIZER_MODEL = "tokenizer"
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")
SCHEDULER_MODEL = "scheduler"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"
SAFETY_THRESHOLDS_FILE = "thresholds.json"  # beside the safety checker's graph: its concepts' thresholds
SAFETY_PREPROCESSOR_FILE = "preprocessor_config.json"  # and its CLIP image processor's config
DEPTH_PREPROCESSOR_FILE = SAFETY_PREPROCESSOR_FILE  # beside the depth estimator's graph: its image processor's config
IP_PREPROCESSOR_FILE = SAFETY_PREPROCESSOR_FILE  # beside the image encoder's graph: its CLIP image processor's config
IP_ADAPTER_FILE = "ip_adapter.json"  # and the IP-Adapter's kind, layers and layer settings (contract/ip_adapters.py)
RECIPE_FILE = "recipe.json"  # the recipe the export followed (contract/recipes.py), beside the scheduler config


def version_dir(repository: Path, model: str) -> Path:
    return Path(repository) / model / VERSION


def onnx_path(repository: Path, network: str) -> Path:
    return version_dir(repository, network) / ONNX_FILE


def tokenizer_dir(repository: Path, which: str) -> Path:
    return version_dir(repository, TOKENIZER_MODEL) / which


def scheduler_config_path(repository: Path) -> Path:
    return version_dir(repository, SCHEDULER_MODEL) / SCHEDULER_CONFIG_FILE


def served_networks(repository: Path) -> tuple[str, ...]:
    """The network models a repository serves: the refiner's and unet_control only where the export
    put their models there, and one model per ControlNet (controlnet_NAME, union_controlnet_NAME) in
    the ControlNet networks' place."""
    from .networks import CONTROLNET_NAME, CONTROLNET_MODEL_PREFIXES, OPTIONAL_NETWORKS, NETWORKS

    repository = Path(repository)
    served = []
    for name in NETWORKS:
        if name == CONTROLNET_NAME:
            served += controlnet_models(repository)
        elif name not in OPTIONAL_NETWORKS or (name not in CONTROLNET_MODEL_PREFIXES and (repository / name).is_dir()):
            served.append(name)
    return tuple(served)


def controlnet_models(repository: Path) -> list[str]:
    """The ControlNet models of a repository (controlnet_NAME and union_controlnet_NAME directories), sorted."""
    from .networks import controlnet_name

    repository = Path(repository)
    if not repository.is_dir():
        return []
    return sorted(d.name for d in repository.iterdir() if d.is_dir() and controlnet_name(d.name))


def graph_precision(graph_dir: Path) -> str | None:
    """The precision export.json records beside a graph (fp16, fp32, or the 8-bit fp8, int8 of
    export/quantize.py); None where there is no record (graphs copied in by hand)."""
    import json

    info = Path(graph_dir) / EXPORT_INFO_FILE
    if not info.exists():
        return None
    data = json.loads(info.read_text())
    return data.get("precision", data.get("dtype"))


def scheduler_class(repository: Path) -> str:
    """The class of the scheduler config a repository holds ("" when it holds none)."""
    path = scheduler_config_path(repository)
    return json.loads(path.read_text()).get("_class_name", "") if path.exists() else ""
