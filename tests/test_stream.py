"""`sdxl_stream` on the real tritonserver (CPU variant, tiny model): a response per step in order,
previews that are TAESD decodes of diffusers' own latents at that step, final images equal to
`ensemble_sdxl`'s; bad input refused naming the field; a cancelled stream stops its work at the next
step while another request goes on; the client's `--stream` writes the previews."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import metric
from reference import recipe_scheduler

from client import ClientError, generate
from contract.configs import config_files, parameters, read_config
from contract.layout import TEMPLATES as REPO
from contract.layout import REPO_ROOT
from contract.recipes import RECIPE_PARAMETERS


def stream(server, prompt="a lighthouse", **options):
    return list(generate(prompt, url=server.grpc_url, protocol="grpc", stream=True, **{"height": 128, "width": 128, **options}))


def test_a_response_per_step_in_order_and_the_final_images_are_the_ensembles(triton):
    case = dict(seed=7, num_inference_steps=4, guidance_scale=2.0, negative_prompt="blurry", num_images_per_prompt=2)
    updates = stream(triton, preview_every=1, **case)
    assert [(u.step, u.num_inference_steps) for u in updates] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [u.final for u in updates] == [False, False, False, True]
    assert all(u.images.shape == (2, 128, 128, 3) and u.images.dtype == np.uint8 for u in updates)
    assert all(u.seeds == [7, 8] for u in updates)
    assert [u.seconds for u in updates] == sorted(u.seconds for u in updates)
    plain = generate("a lighthouse", url=triton.grpc_url, protocol="grpc", height=128, width=128, **case)
    assert np.abs(updates[-1].images.astype(int) - plain.images.astype(int)).max() <= 1
    assert not np.array_equal(updates[0].images, updates[-1].images)


def taesd_previews(loaded, prompt: str, seed: int, steps: int) -> dict[int, np.ndarray]:
    """What a diffusers user gets from the preview VAE (AutoencoderTiny) on the pipeline's latents
    after each step: callback_on_step_end, decode(latents / scaling_factor), postprocess."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.image_processor import VaeImageProcessor

    pipe = loaded("fp32").pipe
    taesd = pipe.preview_vae
    reference = StableDiffusionXLPipeline(**{**pipe.components, "scheduler": recipe_scheduler(pipe)},
                                          force_zeros_for_empty_prompt=True, add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    previews = {}

    def capture(_, index, _timestep, tensors):
        image = taesd.decode(tensors["latents"] / taesd.config.scaling_factor).sample
        pixels = VaeImageProcessor(vae_scale_factor=8).postprocess(image, output_type="np")
        previews[index + 1] = (pixels * 255).round().astype(np.uint8)
        return tensors

    with torch.no_grad():
        reference(prompt, num_inference_steps=steps, guidance_scale=1.0, height=128, width=128,
                  generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np", callback_on_step_end=capture)
    return previews


def test_previews_are_the_preview_vaes_decodes_of_diffusers_latents(triton, loaded):
    updates = stream(triton, "a red rose", seed=11, num_inference_steps=3, preview_every=1)
    expected = taesd_previews(loaded, "a red rose", seed=11, steps=3)
    for update in updates[:-1]:
        difference = np.abs(update.images.astype(int) - expected[update.step].astype(int))
        assert difference.max() <= 2 and difference.mean() < 0.05, f"step {update.step}: {difference.max()}"


def test_preview_every_k_sends_previews_on_every_kth_step_and_progress_on_the_others(triton):
    updates = stream(triton, seed=3, num_inference_steps=5, preview_every=2)
    assert [u.step for u in updates] == [1, 2, 3, 4, 5]
    assert [u.images is not None for u in updates] == [False, True, False, True, True]
    no_previews = stream(triton, seed=3, num_inference_steps=5)
    assert [u.images is not None for u in no_previews] == [False, False, False, False, True]
    assert np.array_equal(no_previews[-1].images, updates[-1].images)


@pytest.mark.parametrize("options,message", [
    (dict(preview_every=9), "preview_every: 9 is not accepted; expected an integer from 0 (no previews) to 8"),
    (dict(preview_every=-1), "preview_every: -1 is not accepted"),
    (dict(num_inference_steps=0), "num_inference_steps: 0 is not accepted; expected an integer from 1 to 8"),
    (dict(height=100), "height: 100 is not accepted; expected a multiple of 64"),
    (dict(prompt=None), "prompt: missing; expected a UTF-8 string"),
    (dict(negative_prompt=b"\xff\xfe"), "negative_prompt: "),
])
def test_bad_input_is_refused_naming_the_field(triton, options, message):
    prompt = options.pop("prompt", "a lighthouse")
    with pytest.raises(ClientError) as caught:
        stream(triton, prompt, **options)
    assert message in str(caught.value)  # a stream's errors carry a message, no status code (Triton's stream protocol)


def test_stream_needs_grpc_and_preview_every_needs_a_stream(triton):
    with pytest.raises(ClientError, match="gRPC streams only; use protocol='grpc'"):
        generate("a cat", url=triton.http_url, protocol="http", stream=True)
    with pytest.raises(ClientError, match="preview_every is an input of the streaming endpoint"):
        generate("a cat", url=triton.http_url, preview_every=1)


def test_cancelled_stream_stops_at_the_next_step_and_others_go_on(triton):
    """8 steps at 1024x1024 (slow on a CPU), left after its first step: the denoiser drops it before
    a later step, no UNet sample is added for it afterwards, the stream's instance is free again, and
    an ensemble request running beside it completes."""
    cancelled_before = metric(triton, "sdxl_engine_cancellations_total")
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(generate, "a city", url=triton.grpc_url, protocol="grpc", seed=5, height=128, width=128)
        updates = generate("a dog", url=triton.grpc_url, protocol="grpc", stream=True, seed=1, num_inference_steps=8,
                           height=1024, width=1024)
        first = next(updates)
        assert first.step == 1
        updates.close()  # stops the stream, cancelling the request
        cancelled = time.monotonic()
        while metric(triton, "sdxl_engine_cancellations_total") == cancelled_before and time.monotonic() < cancelled + 60:
            time.sleep(0.01)
        freed = time.monotonic()
        assert metric(triton, "sdxl_engine_cancellations_total") == cancelled_before + 1
        assert other.result(timeout=120).images.shape == (1, 128, 128, 3)  # undisturbed
    deadline = time.monotonic() + 10
    while metric(triton, "sdxl_stream_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(triton, "sdxl_stream_requests_in_flight") == 0
    samples = metric(triton, "sdxl_unet_samples_total")
    time.sleep(1.0)
    assert metric(triton, "sdxl_unet_samples_total") == samples  # nothing more runs for it
    print(f"cancel to slot free: {(freed - cancelled) * 1000:.0f} ms")
    assert [u.step for u in stream(triton, seed=2, num_inference_steps=2)] == [1, 2]  # the endpoint serves on


def test_stream_metrics_are_exported(triton):
    stream(triton, seed=1, num_inference_steps=2, preview_every=1)
    with urllib.request.urlopen(f"http://127.0.0.1:{triton.metrics_port}/metrics") as response:
        text = response.read().decode()
    for name in ("sdxl_stream_requests_in_flight", "sdxl_stream_first_preview_seconds_bucket",
                 "sdxl_stream_request_seconds_bucket", "sdxl_stream_cancellations_total",
                 "sdxl_stream_cancel_to_free_seconds_bucket"):
        assert name in text, name


def test_client_stream_prints_progress_and_writes_previews(triton, tmp_path):
    out = tmp_path / "cat.png"
    run = subprocess.run([sys.executable, "-m", "client", "a cat", "--stream", "--url", triton.grpc_url, "--seed", "4",
                          "--steps", "3", "--height", "128", "--width", "128", "-o", str(out)],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("step 1/3") and lines[0].endswith(f"preview {tmp_path / 'cat_step1.png'}")
    assert lines[2].startswith("step 3/3") and lines[2].endswith("final")
    assert (tmp_path / "cat_step1.png").exists() and (tmp_path / "cat_step2.png").exists() and out.exists()
    refused = subprocess.run([sys.executable, "-m", "client", "a cat", "--stream", "--protocol", "http"],
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert refused.returncode == 2 and "--stream works over gRPC only" in refused.stderr


@pytest.mark.parametrize("variant", ["production", "cpu"])
def test_stream_checks_requests_as_the_scheduler_does(variant):
    """Its limits and recipe equal the scheduler's (it checks requests before any work), in every variant."""
    stream_config = parameters(read_config(REPO, "sdxl_stream", variant))
    scheduler = parameters(read_config(REPO, "scheduler", variant))
    for key in ("min_size", "max_size", "max_images", *RECIPE_PARAMETERS):
        assert stream_config[key] == scheduler[key], key
    assert read_config(REPO, "sdxl_stream", variant).model_transaction_policy.decoupled
    assert len(config_files(REPO, "sdxl_stream")) == 2


def test_request_parameters_reach_the_admission_as_the_ensembles_do(triton):
    """queue_timeout_ms reaches the stream's admission as the ensemble's reaches the tokenizer's (or a bad value is refused)."""
    assert [u.step for u in stream(triton, seed=1, num_inference_steps=2, queue_timeout_ms=5000)] == [1, 2]
    with pytest.raises(ClientError, match=r"queue_timeout_ms: -1 is not accepted; expected an integer request parameter"):
        stream(triton, seed=1, queue_timeout_ms=-1)


def admitted(server, model: str) -> float:
    """sdxl_admitted_requests_total of one model (the tokenizer, or the stream admitting its own)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sdxl_admitted_requests_total{") and f'model="{model}"' in line)


def test_the_stream_tokenizes_and_admits_in_its_own_process(triton):
    """No hop to the tokenizer model: the stream does its work with its code and config (one config in
    every variant, which the stream reads at load), and counts its admissions under its own name."""
    assert [path.name for path in config_files(REPO, "tokenizer")] == ["config.pbtxt"]
    before = admitted(triton, "tokenizer"), admitted(triton, "sdxl_stream")
    assert [u.step for u in stream(triton, seed=3, num_inference_steps=2, negative_prompt="blurry", guidance_scale=2.0)] == [1, 2]
    assert (admitted(triton, "tokenizer"), admitted(triton, "sdxl_stream")) == (before[0], before[1] + 1)
    limit = int(parameters(read_config(REPO, "tokenizer"))["max_prompt_bytes"])
    with pytest.raises(ClientError, match=rf"prompt: '<{limit + 1} bytes>' is not accepted; expected UTF-8 text of at most {limit} bytes"):
        stream(triton, "x" * (limit + 1), seed=1)
