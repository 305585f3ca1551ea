"""Per-request LoRAs: the sites a LoRA can touch, how their weights travel, and the library on disk.

Design (docs/loras.md): every LoRA's low-rank branches stay unfused and the weights are graph
inputs, so one graph (and one engine) serves the base model and every LoRA, and a batch can mix
them. A *site* is a layer of a network a LoRA may target: every `Linear` and `Conv2d` of the UNet,
and of both CLIP text encoders (the `text_encoder` graph). Each sample's LoRAs (its request's
names and scales) travel in two tensors per network, batched like the graphs' other inputs (what
Triton's dynamic batcher requires: every input's first axis is the batch):

    lora_down   [batch, rank, lora_in]    every site's down matrix (A), flattened, side by side
    lora_up     [batch, lora_out, rank]   every site's up matrix (B), scale and alpha/r folded in

A site reads its columns of `lora_down` and rows of `lora_up` at fixed offsets (the site table,
`lora_sites.json` beside the graph). Stacked LoRAs concatenate along `rank`; a sample with a smaller
rank than the batch's, and a request without LoRAs, is padded with zeros, which add exactly zero.
So a site computes `base(x) + up @ (down @ x)`, PEFT's LoRA math, for every sample at once.

The library: `<repository>-loras/<NAME>/`, beside the model repository (Triton fails to start on any
directory inside it that is not a model, hidden ones included), holds `lora.safetensors` (per site:
`<site>.down` and `.up`, alpha/r folded into up) and `lora.json` (what it is). `python -m export lora
add` writes it; the serving models read it on a request's first use of a name.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .networks import TEXT_ENCODER_NAME, UNET_LORA_NAME

LIBRARY_SUFFIX = "-loras"  # the library of <repository> is the directory <repository>-loras beside it
# Set, it names the library instead (the chart: a library on the model volume or synced from a bucket);
# the serving models inherit it from tritonserver, `python -m export lora` reads it too.
LIBRARY_ENV = "SDXL_LORA_LIBRARY"
WEIGHTS_FILE = "lora.safetensors"
INFO_FILE = "lora.json"
SITES_FILE = "lora_sites.json"  # beside each LoRA-capable graph: <network>/1/lora_sites.json

# The limits (how many per request, the rank of one, |scale|) are the scheduler's config parameters
# max_loras, max_lora_rank and max_lora_scale: contract/limits.py.

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1 to 64 of A-Z a-z 0-9 _ . - starting with a letter or digit"

# The networks whose graphs take LoRA inputs, and the PyTorch modules (pipeline components) each
# graph is traced from: a site's name is `<component>.<module path>`.
LORA_NETWORKS = {"unet": ("unet",), "text_encoder": ("text_encoder", "text_encoder_2")}
# The model whose graph takes each one's LoRA inputs, and holds its site table: the UNet's is
# `unet_lora`, beside the plain `unet` that batches without LoRAs run (contract/networks.py).
LORA_GRAPHS = {"unet": UNET_LORA_NAME, "text_encoder": TEXT_ENCODER_NAME}


class LoraError(ValueError):
    """A LoRA request or library problem the caller can fix; the message names what and how."""


@dataclass(frozen=True)
class Site:
    """One layer a LoRA may target. `down_width`: the columns of its down matrix (in features, or
    in channels x kernel area for a convolution); its up matrix has `out_features` rows."""

    name: str  # <component>.<module path>, e.g. unet.down_blocks.1.attentions.0.proj_in
    kind: str  # "linear" or "conv"
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def down_width(self) -> int:
        return self.in_features * self.kernel[0] * self.kernel[1]

    @property
    def component(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass(frozen=True)
class SiteTable:
    """A network's sites in graph order, with each one's offsets into lora_down / lora_up."""

    network: str
    sites: tuple[Site, ...]
    # Each component's architecture config (diffusers' or transformers' own JSON): what reading a
    # LoRA file needs (its converters and loaders build the modules from it; no weights).
    configs: dict = None

    @property
    def down_offsets(self) -> tuple[int, ...]:
        return tuple(_running_sum(s.down_width for s in self.sites))

    @property
    def up_offsets(self) -> tuple[int, ...]:
        return tuple(_running_sum(s.out_features for s in self.sites))

    @property
    def lora_in(self) -> int:
        return sum(s.down_width for s in self.sites)

    @property
    def lora_out(self) -> int:
        return sum(s.out_features for s in self.sites)

    def by_name(self) -> dict[str, Site]:
        return {s.name: s for s in self.sites}

    def to_json(self) -> str:
        return json.dumps({"network": self.network, "configs": self.configs or {},
                           "sites": [asdict(s) for s in self.sites]}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "SiteTable":
        data = json.loads(text)
        sites = tuple(Site(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}) for s in data["sites"])
        return cls(data["network"], sites, data.get("configs") or {})

    @classmethod
    def read(cls, repository: Path, network: str) -> "SiteTable":
        return cls.from_json(sites_path(repository, network).read_text())


def _running_sum(values) -> list[int]:
    total, out = 0, []
    for value in values:
        out.append(total)
        total += value
    return out


def sites_of(network: str, components: dict) -> SiteTable:
    """The site table of a network from its PyTorch components ({component name: module}), in the
    order the modules are registered (deterministic for a given architecture). Shapes only: meta
    modules do."""
    from torch import nn

    sites = []
    for component in LORA_NETWORKS[network]:
        inside_adapter = None  # a PEFT LoRA layer (diffusers' loaded adapters): it is its base layer
        for path, module in components[component].named_modules():
            if inside_adapter is not None and path.startswith(inside_adapter + "."):
                continue
            inside_adapter = None
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                inside_adapter, module = path, module.base_layer
            if isinstance(module, nn.Linear):
                sites.append(Site(f"{component}.{path}", "linear", module.in_features, module.out_features))
            elif isinstance(module, nn.Conv2d):
                if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                    raise LoraError(f"{component}.{path}: a grouped or non-zero-padded convolution cannot be a LoRA site")
                sites.append(Site(f"{component}.{path}", "conv", module.in_channels, module.out_channels,
                                  tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                                  tuple(module.dilation)))
    configs = {component: json.loads(_config_json(components[component])) for component in LORA_NETWORKS[network]}
    return SiteTable(network, tuple(sites), configs)


def _config_json(module) -> str:
    config = module.config
    return config.to_json_string() if hasattr(config, "to_json_string") else module.to_json_string()


# --- The library on disk -------------------------------------------------------------------------

def library_dir(repository: Path) -> Path:
    if os.environ.get(LIBRARY_ENV):
        return Path(os.environ[LIBRARY_ENV]).resolve()
    repository = Path(repository).resolve()
    return repository.with_name(repository.name + LIBRARY_SUFFIX)


def sites_path(repository: Path, network: str) -> Path:
    """The site table of `network` (a key of LORA_NETWORKS), beside the graph that takes its LoRA inputs."""
    return Path(repository) / LORA_GRAPHS[network] / "1" / SITES_FILE


def check_name(name: str, field: str = "lora_names") -> str:
    """A library name: refuses empty, huge and path-like names (`../x`) before any file is touched."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = repr(name[:80] + "..." if isinstance(name, str) and len(name) > 80 else name)
        raise LoraError(f"{field}: {shown} is not a LoRA name; expected {NAME_RULE}")
    return name


def check_scale(scale: float, limit: float, field: str = "lora_scales") -> float:
    if not (math.isfinite(scale) and abs(scale) <= limit):
        raise LoraError(f"{field}: {scale!r} is not accepted; expected a finite number from {-limit:g} to {limit:g}")
    return float(scale)


@dataclass(frozen=True)
class LoraInfo:
    """lora.json: what `lora list` and the client's --info show."""

    name: str
    source: str  # the file or directory it was added from
    sha256: str  # of the weights file as installed: a changed LoRA under the same name is a new one
    rank: int  # the largest rank over its sites
    networks: dict  # network -> number of sites it targets
    targets: list  # the kinds of layer it touches: attention, feed-forward, projection, convolution, ...
    parameters: int
    size_bytes: int
    added: str  # UTC, ISO 8601

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def read(cls, directory: Path) -> "LoraInfo":
        return cls(**json.loads((Path(directory) / INFO_FILE).read_text()))


def installed(repository: Path) -> dict[str, Path]:
    """{name: directory} of the library's complete LoRAs (a directory is complete once it has its
    info file: the installer renames a finished directory into place)."""
    root = library_dir(repository)
    if not root.is_dir():
        return {}
    return {d.name: d for d in sorted(root.iterdir())
            if d.is_dir() and NAME_PATTERN.fullmatch(d.name) and (d / INFO_FILE).is_file()}


def describe(repository: Path) -> list[LoraInfo]:
    return [LoraInfo.read(directory) for directory in installed(repository).values()]


def served_description(info: LoraInfo) -> dict:
    """What a client sees of a LoRA (the `loras` model, `python -m client --info`): not its source,
    a path on the machine that added it."""
    return {key: value for key, value in asdict(info).items() if key != "source"}


def library_table(entries: list[dict]) -> str:
    """The library as a table (`lora list`, `python -m client --info`): entries as served_description gives them."""
    rows = [("NAME", "RANK", "TARGETS", "SITES", "SIZE")]
    for entry in entries:
        sites = ", ".join(f"{network} {count}" for network, count in entry["networks"].items())
        rows.append((entry["name"], str(entry["rank"]), ", ".join(entry["targets"]), sites, f"{entry['size_bytes'] / 1e6:.1f} MB"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
