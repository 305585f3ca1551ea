"""The ControlNets a deployment serves, and how requests and exports name them.

`python -m export onnx --controlnet NAME=PATH` (repeatable) exports each ControlNet as its own model,
`controlnet_NAME` (contract/networks.py CONTROLNET); requests name them in `control_names`. Pure data:
no torch, no diffusers here.
"""

from __future__ import annotations

import re
from typing import NamedTuple

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
NAME_RULE = "1 to 32 of a-z 0-9 _ - starting with a letter or digit"


# What makes a control map from a request's image on the server (control_preprocess), as the published
# SDXL ControlNets' diffusers examples make them: canny, OpenCV's Canny edges (thresholds: the loops'
# canny_thresholds parameter, default 100,200) on three channels; depth, the export's depth estimator
# (--depth-estimator: Depth Anything V2 Small) normalized as diffusers' SDXL depth ControlNet example does.
PREPROCESSORS = ("canny", "depth")
DEPTH = "depth"


# ControlNet-Union's control types (xinsir's controlnet-union-sdxl-1.0, its model card; ControlNet++):
# the name a request gives after NAME/ -> the index of diffusers' control_mode. Aliases name the inputs
# each type was trained on; promax's two more types (tile, repaint) exist where the model's
# num_control_type has them.
UNION_MODES = {
    "openpose": 0, "depth": 1,
    "hed": 2, "pidi": 2, "scribble": 2, "softedge": 2, "ted": 2,
    "canny": 3, "lineart": 3, "anime_lineart": 3, "mlsd": 3,
    "normal": 4, "segment": 5, "tile": 6, "repaint": 7,
}
# The union modes whose maps a server-side preprocessor makes (control_preprocess): the same as a
# plain ControlNet declaring it.
UNION_MODE_PREPROCESSORS = {"canny": "canny", "depth": DEPTH}
UNION_SEPARATOR = "/"


def union_mode_names(control_types: int) -> tuple[str, ...]:
    """The mode names a union model of `control_types` types (its config's num_control_type) serves."""
    return tuple(name for name, index in UNION_MODES.items() if index < control_types)


class ServedControl(NamedTuple):
    """A name a request may put in control_names, as a deployment serves it: the model, the union mode
    (None: a plain ControlNet) and the preprocessor control_preprocess runs (None: none)."""

    model: str
    mode: int | None
    preprocessor: str | None


class ControlNetSource(NamedTuple):
    """A ControlNet an export serves: its name, where it comes from (a diffusers ControlNet directory or
    hub id) and the preprocessor it declares (None: requests send control maps)."""

    name: str
    path: str
    preprocessor: str | None = None


class ControlNetError(ValueError):
    """A ControlNet name or flag that cannot be used; the message names it and the rule."""


def check_name(name: str, what: str = "--controlnet") -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ControlNetError(f"{what}: name {name[:80]!r} is not a ControlNet name ({NAME_RULE})")
    return name


def parse_flag(text: str) -> tuple[str, str]:
    """`NAME=PATH` (PATH a diffusers ControlNet directory or hub id) -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ControlNetError(f"--controlnet {text!r}: expected NAME=PATH (PATH: a diffusers ControlNet directory or hub id)")
    return check_name(name, f"--controlnet {text!r}"), path


def parse_preprocessor_flag(text: str) -> tuple[str, str]:
    """`NAME=KIND` of --controlnet-preprocessor -> (name, kind), KIND one of PREPROCESSORS."""
    name, sep, kind = text.partition("=")
    if not sep or kind not in PREPROCESSORS:
        raise ControlNetError(f"--controlnet-preprocessor {text!r}: expected NAME=KIND, KIND one of {', '.join(PREPROCESSORS)}")
    return check_name(name, f"--controlnet-preprocessor {text!r}"), kind


def sources(controlnets: list[tuple[str, str]], preprocessors: list[tuple[str, str]] = (),
            depth_estimator: bool = False) -> tuple[ControlNetSource, ...]:
    """The export's ControlNets: each name once, each preprocessor for one of them, depth only with a
    depth estimator (`depth_estimator`: the export has one)."""
    names = [name for name, _ in controlnets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ControlNetError(f"--controlnet: {', '.join(repeated)} given more than once; each name serves one ControlNet")
    declared = dict(preprocessors)
    unknown = sorted(set(declared) - set(names))
    if unknown:
        raise ControlNetError(f"--controlnet-preprocessor: {', '.join(unknown)} is not a --controlnet of this export "
                              f"({', '.join(names) or 'none'})")
    depth = sorted(name for name, kind in declared.items() if kind == DEPTH)
    if depth and not depth_estimator:
        raise ControlNetError(f"--controlnet-preprocessor {depth[0]}=depth: depth maps need a depth estimator; add "
                              "--depth-estimator (depth-anything/Depth-Anything-V2-Small-hf or a directory of one)")
    return tuple(ControlNetSource(name, path, declared.get(name)) for name, path in controlnets)
