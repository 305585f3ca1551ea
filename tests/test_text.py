"""serving/text.py: the prompts' token ids, from the `tokenizers` library directly, equal to what
transformers' CLIPTokenizer (diffusers' tokenizer) makes from the same saved files: padding with each
tokenizer's own pad token ("<|endoftext|>" for CLIP ViT-L, "!" for bigG), truncation to 77 with the
end token kept, normalization (NFC, whitespace, lowercase) and special tokens."""

from __future__ import annotations

import numpy as np
import pytest

from serving.text import PromptTokenizer

PROMPTS = ["", " ", "a photo of a cat", "A PHOTO OF A CAT!!", "über café naïve 日本語 🚀", "word " * 100,
           "  leading and   multiple   spaces  ", "tabs\tand\nnewlines", "x" * 500, "a,b.c;d:e'f\"g",
           "<|endoftext|> a special token in the text", "<|startoftext|>", "don't won't it's", "!!!!"]


@pytest.mark.parametrize("name, directory", [("input_ids", "tokenizer"), ("input_ids_2", "tokenizer_2")])
def test_token_ids_equal_transformers_clip_tokenizer(tiny_dir, name, directory):
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(tiny_dir / directory)
    expected = np.asarray(reference(PROMPTS, padding="max_length", max_length=reference.model_max_length,
                                    truncation=True).input_ids, dtype=np.int32)
    ids = PromptTokenizer(tiny_dir)(PROMPTS)[name]
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, expected)


def test_a_tokenizer_without_its_json_is_named(tiny_dir, tmp_path):
    import shutil

    for directory in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tiny_dir / directory, tmp_path / directory)
    (tmp_path / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer_2/tokenizer.json: no such file; export the repository again"):
        PromptTokenizer(tmp_path)
