"""The diffusers scheduler class a loop runs, imported for what the loop needs and no more.

Importing anything from diffusers runs `diffusers.utils.torch_utils`, which imports `torch._dynamo`
for one decorator (`maybe_allow_in_graph`, used by model classes, never by schedulers): 0.9 s of CPU
and 100 MB in each process that runs a loop, at every (re)start (benchmarks/results/start_cpu.md).
diffusers falls back to a no-op decorator when that import fails, so the import below makes it fail
on purpose, for the duration of the scheduler module's import only: later code that needs
`torch._dynamo` (none of the loop's) imports the real one as usual.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from pathlib import Path

DYNAMO = "torch._dynamo"


def scheduler_class(class_name: str) -> type:
    """diffusers.<class_name> (a scheduler), from its own module."""
    import torch  # noqa: F401 - loaded first: the placeholder below must not stand in for a real import of torch's

    placeholder = types.ModuleType(DYNAMO)  # no attributes: `from torch._dynamo import x` raises ImportError
    shadowed = sys.modules.setdefault(DYNAMO, placeholder)
    try:
        schedulers = importlib.import_module("diffusers.schedulers")
        return getattr(schedulers, class_name)
    finally:
        if shadowed is placeholder:
            del sys.modules[DYNAMO]


def load_scheduler(directory: Path, class_name: str) -> tuple[type, dict]:
    """The class and its config from `directory`'s scheduler_config.json, less the keys the class does
    not take (diffusers would warn about them on every request)."""
    cls = scheduler_class(class_name)
    config = cls.load_config(directory)
    accepted = inspect.signature(cls.__init__).parameters
    return cls, {key: value for key, value in config.items() if key in accepted}
