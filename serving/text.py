"""Prompts to token ids for the `text_encoder` graph, with SDXL's two CLIP tokenizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract import layout


def texts_to_encode(prompt: str, negative_prompt: str, do_classifier_free_guidance: bool, refiner: bool = False) -> list[str]:
    """The prompt, then the negative prompt when CFG uses it. With CFG and an empty negative prompt
    the base uses zero embeddings instead (SDXL's force_zeros_for_empty_prompt), so it is not encoded,
    unless a refiner is served: the SDXL refiner encodes the empty prompt (its force_zeros_for_empty_prompt
    is false; serving/denoise.py)."""
    if do_classifier_free_guidance and (negative_prompt or refiner):
        return [prompt, negative_prompt]
    return [prompt]


class PromptTokenizer:
    """Both tokenizers, from the files the exporter wrote (`<repository>/tokenizer/1/`)."""

    def __init__(self, directory: Path):
        from transformers import CLIPTokenizer

        self.tokenizers = {
            "input_ids": CLIPTokenizer.from_pretrained(Path(directory) / "tokenizer"),
            "input_ids_2": CLIPTokenizer.from_pretrained(Path(directory) / "tokenizer_2"),
        }

    @classmethod
    def from_repository(cls, repository: Path) -> "PromptTokenizer":
        return cls(layout.version_dir(repository, layout.TOKENIZER_MODEL))

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """INT32 [len(texts), 77] per tokenizer: padded to max length and truncated, as diffusers does."""
        return {
            name: np.asarray(
                tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids,
                dtype=np.int32,
            )
            for name, tokenizer in self.tokenizers.items()
        }
