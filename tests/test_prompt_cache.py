"""The prompt cache (docs/serving.md, "The prompt cache"): Triton's response cache on text_encoder, keyed on
its inputs (token ids, the texts' LoRA weights). On the shared server: a repeated prompt skips the text encoder
on both endpoints (the hit counted, the image unchanged), a changed prompt or negative prompt does not;
the server's command line sizes it, and 0 turns it off."""

from __future__ import annotations

import numpy as np
from helpers import metric

from client import generate
from serving.server import PROMPT_CACHE_MB, TritonInstall, TritonServer


def counts(server) -> tuple[float, float]:
    """(hits, misses) of text_encoder's response cache."""
    return (metric(server, "nv_cache_num_hits_per_model"), metric(server, "nv_cache_num_misses_per_model"))


def ask(server, prompt: str, **options):
    return generate(prompt, url=server.grpc_url, protocol="grpc", seed=3, num_inference_steps=1, height=128, width=128, **options)


def test_a_repeated_prompt_skips_the_text_encoder_on_both_endpoints(triton):
    prompt = "a prompt only this test sends"
    hits, misses = counts(triton)
    first = ask(triton, prompt)
    assert counts(triton) == (hits, misses + 1)
    again = ask(triton, prompt)
    assert counts(triton) == (hits + 1, misses + 1)
    assert np.array_equal(first.images, again.images)
    streamed = list(ask(triton, prompt, stream=True))[-1]  # the stream's BLS call hits the same entry
    assert counts(triton) == (hits + 2, misses + 1)
    assert np.array_equal(streamed.images, first.images)


def test_what_changes_the_text_encoders_inputs_misses(triton):
    prompt = "another prompt only this test sends"
    ask(triton, prompt)
    hits, misses = counts(triton)
    ask(triton, prompt + ".")  # other tokens
    ask(triton, prompt, guidance_scale=2.0, negative_prompt="blurry")  # CFG with a negative prompt: a second row
    assert counts(triton) == (hits, misses + 2)
    ask(triton, prompt, guidance_scale=2.0)  # CFG with an empty negative prompt: zeros, not encoded (the same inputs)
    ask(triton, prompt, guidance_scale=2.0, negative_prompt="blurry")
    assert counts(triton) == (hits + 2, misses + 2)


def test_the_command_line_sizes_the_cache_and_zero_turns_it_off():
    install = TritonInstall.bundled()
    command = TritonServer().command(install)
    assert f"--cache-config=local,size={PROMPT_CACHE_MB << 20}" in command
    assert any(arg.startswith("--cache-directory=") for arg in command)  # the bundled server's local cache
    off = TritonServer(prompt_cache_bytes=0).command(install)
    assert not any(arg.startswith("--cache") for arg in off)
