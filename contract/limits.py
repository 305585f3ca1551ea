"""What a deployment accepts: the endpoint's limits, kept as the `scheduler` model's config parameters.

The production values follow the TensorRT engines' profiles (`python -m export engines` builds them
from these), so the engines, the configs and the endpoint's checks cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Limits:
    min_size: int = 512
    max_size: int = 1536
    size_multiple: int = 64
    min_steps: int = 1
    max_steps: int = 8
    max_images: int = 4
    # Bytes of UTF-8, each of prompt and negative_prompt, checked before tokenizing. CLIP reads 77
    # tokens (about 300 bytes of English); 4 KiB leaves room for long prompts in any script, which
    # the tokenizers truncate as diffusers does, and refuses megabyte texts before any work.
    max_prompt_bytes: int = 4096

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "Limits":
        """From a model config's `parameters` (string values); unknown keys are ignored."""
        values = {}
        for key in ("min_size", "max_size", "max_images", "max_prompt_bytes"):
            if key in parameters:
                try:
                    values[key] = int(parameters[key])
                except ValueError:
                    raise ValueError(f"model config parameter {key}={parameters[key]!r}: expected an integer") from None
        limits = cls(**values)
        if not (limits.size_multiple <= limits.min_size <= limits.max_size) or limits.min_size % limits.size_multiple:
            raise ValueError(f"model config parameters min_size={limits.min_size}, max_size={limits.max_size}: "
                             f"expected multiples of {limits.size_multiple} with min_size <= max_size")
        for key in ("max_images", "max_prompt_bytes"):
            if getattr(limits, key) < 1:
                raise ValueError(f"model config parameter {key}={getattr(limits, key)}: expected at least 1")
        return limits

    @property
    def sizes(self) -> str:
        return f"a multiple of {self.size_multiple} from {self.min_size} to {self.max_size}"
