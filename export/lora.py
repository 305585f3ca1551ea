"""`python -m export lora add|list|remove`: the repository's LoRA library (contract/loras.py).

`add` reads a LoRA the way `StableDiffusionXLPipeline.load_lora_weights` does: diffusers'
`lora_state_dict` (diffusers/PEFT files, kohya/A1111 `lora_unet_...`/`lora_te1_...`/`lora_te2_...`
with alphas) and its `load_lora_into_unet` / `load_lora_into_text_encoder` (PEFT) into the served
architecture, built from the configs beside the graphs with *hollow* weights (one zero element
each, broadcast: no memory, whatever the model's size). What PEFT made of each layer (down and up
matrices, alpha/r scaling) is then read off the LoRA layers, checked against the site table, and
installed atomically: a directory is written beside the library and renamed into place, so a
reader sees the whole LoRA or none of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from contract import layout, loras
from contract.loras import LORA_NETWORKS, INFO_FILE, WEIGHTS_FILE, LoraError, LoraInfo, SiteTable

from .progress import step
from .sources import ExportError, _split_lora_source, _diffusers_errors_only

ADAPTER = "library"
TARGET_KINDS = (  # (kind, substrings of a site name), first match wins: what `lora list` shows
    ("attention", (".attn1.", ".attn2.", ".self_attn.", ".attn.")),
    ("feed-forward", (".ff.", ".mlp.")),
    ("convolution", ()),  # by the site's kind
    ("projection", ("proj_in", "proj_out", "text_projection")),
    ("embedding", ("time_embedding", "add_embedding", "time_emb_proj")),
)


def _hollow(model):
    """Replace every parameter and buffer by one zero broadcast to its shape: the module keeps its
    structure and shapes (what PEFT inspects) at no memory cost. Never run it."""
    import torch

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(param.shape),
                                                               requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.zeros((), dtype=buffer.dtype).expand(buffer.shape)
    return model


def _hollow_components(tables: dict[str, SiteTable]) -> dict:
    """The served UNet and text encoders, hollow, from the configs the export wrote beside the graphs."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = {**tables["unet"].configs, **tables["text_encoder"].configs}
    with init_empty_weights():
        built = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
        }
    return {name: _hollow(module) for name, module in built.items()}


def site_tables(repository: Path) -> dict[str, SiteTable]:
    tables = {}
    for network in LORA_NETWORKS:
        path = loras.sites_path(repository, network)
        if not path.exists():
            raise ExportError(f"{repository}: no {network}/1/{loras.SITES_FILE}; export the model first "
                              f"(`make export-tiny`, or `python -m export onnx --out {repository}`)")
        tables[network] = SiteTable.from_json(path.read_text())
    return tables


def _fit_problem(source: str, error: Exception) -> ExportError:
    from .sources import LoraSpec, _fit_error

    return _fit_error(LoraSpec(source), error)


def read_lora(source: str, tables: dict[str, SiteTable]) -> dict[str, "tuple"]:
    """{site name: (down [rank, down_width] fp32, up [out, rank] fp32 with PEFT's scaling folded in)}
    for every layer the LoRA at `source` touches, as diffusers + PEFT load it into this architecture."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    path = Path(source).expanduser()
    if not path.exists():
        raise ExportError(f"lora add {source!r}: no such file or directory")
    location, kwargs = _split_lora_source(str(path))
    components = _hollow_components(tables)
    try:
        state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
            location, unet_config=components["unet"].config, return_lora_metadata=True, **kwargs)
    except Exception as error:  # a corrupt or foreign file: diffusers' and safetensors' many types
        raise ExportError(f"lora add {source!r}: cannot read it as a LoRA: {' '.join(str(error).split())[:300]}") from error
    if not state or not all("lora" in key for key in state):
        raise ExportError(f"lora add {source!r}: not a LoRA checkpoint (every weight name must contain 'lora')")
    prefixes = {key.split(".", 1)[0] for key in state}
    unknown = prefixes - set(components)
    if unknown:
        raise ExportError(f"lora add {source!r}: weights for {', '.join(sorted(unknown))}, which SDXL does not have "
                          f"(a LoRA for another architecture?)")
    try:
        with _diffusers_errors_only(on=False):
            if "unet" in prefixes:
                StableDiffusionXLPipeline.load_lora_into_unet(
                    state, network_alphas=alphas, unet=components["unet"], adapter_name=ADAPTER, metadata=metadata,
                    low_cpu_mem_usage=True)
            for component in ("text_encoder", "text_encoder_2"):
                if component in prefixes:
                    StableDiffusionXLPipeline.load_lora_into_text_encoder(
                        state, network_alphas=alphas, text_encoder=components[component], prefix=component,
                        lora_scale=1.0, adapter_name=ADAPTER, metadata=metadata, low_cpu_mem_usage=True)
    except Exception as error:
        raise _fit_problem(source, error) from error

    sites = {name: site for table in tables.values() for name, site in table.by_name().items()}
    weights, loaded_keys = {}, 0
    for component, module_root in components.items():
        for path_, module in module_root.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
                continue
            name = f"{component}.{path_}"
            if name not in sites:
                raise ExportError(f"lora add {source!r}: it adapts {name} ({type(module.base_layer).__name__}), which is "
                                  f"not a LoRA site of this repository (Linear and Conv2d layers only)")
            if module.use_dora.get(ADAPTER) or getattr(module, "lora_bias", {}).get(ADAPTER):
                raise ExportError(f"lora add {source!r}: {name} uses DoRA or a LoRA bias, which are not supported; "
                                  f"use a plain LoRA")
            down = module.lora_A[ADAPTER].weight.detach().float()
            up = module.lora_B[ADAPTER].weight.detach().float()
            scaling = float(module.scaling[ADAPTER])
            weights[name] = (down.reshape(down.shape[0], -1).numpy(), (up.reshape(up.shape[0], -1) * scaling).numpy())
            loaded_keys += 2
    expected = sum(1 for key in state if key.endswith(("lora_A.weight", "lora_B.weight")))
    if not weights:
        raise ExportError(f"lora add {source!r}: none of its weights match a layer of this model's UNet or text encoders "
                          f"(a LoRA for another architecture, e.g. SD 1.5?)")
    if expected and loaded_keys < expected:
        raise ExportError(f"lora add {source!r}: {expected - loaded_keys} of its {expected} weights match no layer of this "
                          f"model (a LoRA for another architecture?)")
    return weights


def _targets(names, sites) -> list[str]:
    found = set()
    for name in names:
        site = sites[name]
        for kind, needles in TARGET_KINDS:
            if (kind == "convolution" and site.kind == "conv") or any(n in name for n in needles):
                found.add(kind)
                break
        else:
            found.add("other")
    return sorted(found)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(16 * 1024**2), b""):
            digest.update(chunk)
    return digest.hexdigest()


def graphs_dtype(repository: Path) -> str:
    info = layout.version_dir(repository, "unet") / layout.EXPORT_INFO_FILE
    return json.loads(info.read_text())["dtype"] if info.exists() else "fp32"


def add(repository: Path, name: str, source: str, max_rank: int) -> LoraInfo:
    """Validate the LoRA at `source` against the repository's sites and install it under `name`."""
    import numpy as np
    from safetensors.numpy import save_file

    repository = Path(repository)
    try:
        loras.check_name(name, "NAME")
    except LoraError as error:
        raise ExportError(f"lora add: {error}") from None
    library = loras.library_dir(repository)
    if (library / name).exists():
        raise ExportError(f"lora add: {name!r} is already in the library of {repository}; `lora remove {name}` first")
    tables = site_tables(repository)
    with step(f"reading {source} through diffusers' LoRA loaders"):
        weights = read_lora(source, tables)
    rank = max(down.shape[0] for down, _ in weights.values())
    if rank > max_rank:
        raise ExportError(f"lora add {source!r}: rank {rank} is above this repository's max_lora_rank {max_rank} "
                          f"(the engines' profiles are sized for it); use a LoRA of rank {max_rank} or less")
    sites = {n: s for table in tables.values() for n, s in table.by_name().items()}
    dtype = np.float16 if graphs_dtype(repository) == "fp16" else np.float32
    tensors = {}
    for site_name, (down, up) in weights.items():
        tensors[f"{site_name}.down"] = np.ascontiguousarray(down.astype(dtype))
        tensors[f"{site_name}.up"] = np.ascontiguousarray(up.astype(dtype))
    library.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=library, prefix=".incoming-"))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE))
        networks = {network: sum(1 for n in weights if n in table.by_name()) for network, table in tables.items()}
        info = LoraInfo(
            name=name, source=str(Path(source).expanduser().resolve()), sha256=_file_sha256(staging / WEIGHTS_FILE),
            rank=int(rank), networks={k: v for k, v in networks.items() if v}, targets=_targets(weights, sites),
            parameters=int(sum(d.size + u.size for d, u in weights.values())),
            size_bytes=(staging / WEIGHTS_FILE).stat().st_size,
            added=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        (staging / INFO_FILE).write_text(info.to_json())
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, library / name)  # atomic: the whole LoRA appears at once
        except OSError:
            raise ExportError(f"lora add: {name!r} appeared in the library meanwhile; `lora remove {name}` first") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def remove(repository: Path, name: str) -> None:
    """Take `name` out of the library at once (a rename), then delete its files. Requests that
    already read it finish with it; later ones are refused."""
    try:
        loras.check_name(name, "NAME")
    except LoraError as error:
        raise ExportError(f"lora remove: {error}") from None
    directory = loras.library_dir(repository) / name
    if not directory.is_dir():
        known = ", ".join(loras.installed(repository)) or "none"
        raise ExportError(f"lora remove: no LoRA {name!r} in the library of {repository} (installed: {known})")
    doomed = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".removed-{name}-"))
    os.rename(directory, doomed / name)
    shutil.rmtree(doomed, ignore_errors=True)


def listing(repository: Path) -> str:
    described = loras.describe(repository)
    if not described:
        return f"no LoRAs in the library of {repository} (add one: python -m export lora add NAME PATH)"
    return loras.library_table([loras.served_description(info) for info in described])
