"""The text_encoder graph, fed by the exported tokenizers, equals diffusers' SDXL `encode_prompt`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, no_lora_feed, ort_session

from contract import layout

LONG_PROMPT = ", ".join(["a highly detailed oil painting of a lighthouse by the sea at sunset"] * 8)
PROMPTS = {
    "empty": "",
    "short": "a photo of an astronaut riding a horse on the moon",
    "long": LONG_PROMPT,
}


def tokenize(repository, which: str, prompts: list[str]) -> np.ndarray:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(layout.tokenizer_dir(repository, which))
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int32)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_encoder_matches_encode_prompt(loaded, exported, dtype, prompt):
    pipe, repository = loaded(dtype).pipe, exported(dtype)
    text = PROMPTS[prompt]
    with torch.no_grad():
        expected, _, expected_pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
    feed = {name: tokenize(repository, which, [text]) for name, which in (("input_ids", "tokenizer"), ("input_ids_2", "tokenizer_2"))}
    session = ort_session(repository, "text_encoder")
    actual, actual_pooled = session.run(None, no_lora_feed(session, feed))
    assert_close(actual, expected.numpy(), dtype, f"prompt_embeds ({prompt})")
    assert_close(actual_pooled, expected_pooled.numpy(), dtype, f"pooled_prompt_embeds ({prompt})")


def test_long_prompt_is_truncated_at_77_tokens(loaded, exported):
    """The long prompt really is longer than 77 tokens, and only its first 77 count."""
    repository = exported("fp32")
    untruncated = loaded("fp32").pipe.tokenizer(LONG_PROMPT).input_ids
    assert len(untruncated) > 77
    session = ort_session(repository, "text_encoder")
    feed = {name: tokenize(repository, which, [LONG_PROMPT]) for name, which in (("input_ids", "tokenizer"), ("input_ids_2", "tokenizer_2"))}
    assert feed["input_ids"].shape == (1, 77)
    longer = LONG_PROMPT + ", with a completely different ending about cats and neon lights"
    feed_longer = {name: tokenize(repository, which, [longer]) for name, which in (("input_ids", "tokenizer"), ("input_ids_2", "tokenizer_2"))}
    np.testing.assert_array_equal(session.run(None, no_lora_feed(session, feed))[0],
                                  session.run(None, no_lora_feed(session, feed_longer))[0])


def test_tokenizer_2_pads_like_sdxl(exported):
    """SDXL's tokenizer pads with <|endoftext|>, tokenizer_2 with '!' (id 0)."""
    repository = exported("fp32")
    ids, ids_2 = tokenize(repository, "tokenizer", [""]), tokenize(repository, "tokenizer_2", [""])
    assert ids[0, 1] == ids[0, -1] != 0  # bos, eos, then eos padding
    assert ids_2[0, 1] == ids[0, 1] and ids_2[0, -1] == 0
