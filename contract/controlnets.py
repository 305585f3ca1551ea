"""The ControlNets a deployment serves, and how requests and exports name them.

`python -m export onnx --controlnet NAME=PATH` (repeatable) exports each ControlNet as its own model,
`controlnet_NAME` (contract/networks.py CONTROLNET); requests name them in `control_names`. Pure data:
no torch, no diffusers here.
"""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
NAME_RULE = "1 to 32 of a-z 0-9 _ - starting with a letter or digit"


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


def check_unique(controlnets: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    names = [name for name, _ in controlnets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ControlNetError(f"--controlnet: {', '.join(repeated)} given more than once; each name serves one ControlNet")
    return tuple(controlnets)
