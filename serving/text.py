"""Prompts to token ids for the `text_encoder` graph, with SDXL's two CLIP tokenizers, and one request's
text encoder inputs (TextInputs): the `tokenizer` model's work, which `sdxl_stream` does in its own process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from contract import layout
from contract.limits import Limits
from contract.networks import TEXT_ENCODER

from .endpoint import check_guidance, check_prompts
from .loras import check_request

# A request's inputs that the text encoder's inputs depend on (TextInputs).
TEXT_INPUTS = ("prompt", "negative_prompt", "guidance_scale", "lora_names", "lora_scales")


def texts_to_encode(prompt: str, negative_prompt: str, do_classifier_free_guidance: bool, refiner: bool = False) -> list[str]:
    """The prompt, then the negative prompt when CFG uses it. With CFG and an empty negative prompt
    the base uses zero embeddings instead (SDXL's force_zeros_for_empty_prompt), so it is not encoded,
    unless a refiner is served: the SDXL refiner encodes the empty prompt (its force_zeros_for_empty_prompt
    is false; serving/denoise.py)."""
    if do_classifier_free_guidance and (negative_prompt or refiner):
        return [prompt, negative_prompt]
    return [prompt]


class PromptTokenizer:
    """Both tokenizers, from the files the exporter wrote (`<repository>/tokenizer/1/`).

    Run by the `tokenizers` library directly from each `tokenizer.json`, padded and truncated to the
    tokenizer config's `model_max_length` with its `pad_token`: what transformers' CLIPTokenizer (a
    `tokenizers` backend in transformers 5) computes, without importing transformers, which cost each
    tokenizer process 0.8 s of CPU at every start (tests/test_text.py compares the two)."""

    def __init__(self, directory: Path):
        self.tokenizers = {"input_ids": _clip_tokenizer(Path(directory) / "tokenizer"),
                           "input_ids_2": _clip_tokenizer(Path(directory) / "tokenizer_2")}

    @classmethod
    def from_repository(cls, repository: Path) -> "PromptTokenizer":
        return cls(layout.version_dir(repository, layout.TOKENIZER_MODEL))

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """INT32 [len(texts), 77] per tokenizer: padded to max length and truncated, as diffusers does."""
        return {name: np.asarray([encoding.ids for encoding in tokenizer.encode_batch(texts)], dtype=np.int32)
                for name, tokenizer in self.tokenizers.items()}


def _clip_tokenizer(directory: Path):
    """A `tokenizers.Tokenizer` that pads and truncates as the saved CLIPTokenizer's config says."""
    from tokenizers import Tokenizer

    config_path, model_path = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path}: no such file; export the repository again (python -m export onnx), "
                                "which writes each tokenizer's tokenizer.json")
    config = json.loads(config_path.read_text())
    tokenizer = Tokenizer.from_file(str(model_path))
    length, pad = int(config["model_max_length"]), config["pad_token"]
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length, pad_id=tokenizer.token_to_id(pad), pad_token=pad)
    return tokenizer


class TextInputs:
    """One request's `text_encoder` inputs from its raw inputs (TEXT_INPUTS): the texts checked against
    `limits`, the negative prompt tokenized only when CFG uses it, and each text's LoRA weights for the
    text encoder (`loras`, serving.loras.ServingLoras: the request's text-encoder LoRAs, or zeros). Bad
    input raises InvalidInput or LoraError naming the input, before anything is tokenized."""

    def __init__(self, tokenizer: PromptTokenizer, limits: Limits, loras):
        self.tokenizer, self.limits, self.loras = tokenizer, limits, loras

    def __call__(self, raw: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        prompt, negative = check_prompts(raw, self.limits)
        # An omitted guidance_scale is the recipe's default, as the loop will read it (sdxl-base: CFG 5.0).
        do_cfg = check_guidance(raw.get("guidance_scale"), self.limits.default_guidance) > 1.0
        named = check_request(raw.get("lora_names"), raw.get("lora_scales"), self.limits.max_loras, self.limits.max_lora_scale)
        held = self.loras.load(named)
        texts = texts_to_encode(prompt, negative, do_cfg, refiner=self.limits.has_refiner)
        return {**self.tokenizer(texts), **self.loras.tensors(TEXT_ENCODER.name, held, len(texts))}
