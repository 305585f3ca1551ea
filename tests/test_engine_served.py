"""The continuous-batching engine on the real tritonserver: `ensemble_sdxl` with the scheduler in
engine mode (parameter engine: "denoiser") keeps its contract over HTTP and gRPC and serves the
images the loop design serves (and diffusers'); the `denoiser` model streams previews in order and
its final latents equal the non-streamed ones; a cancelled stream stops its work while another
request goes on."""

from __future__ import annotations

import json
import queue
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import metric
from reference import diffusers_images

from client import generate
from contract.configs import CPU_DTYPE


def ask(server, protocol="grpc", **options):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return generate(options.pop("prompt", "a lighthouse"), url=url, protocol=protocol,
                    **{"height": 128, "width": 128, **options})


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_engine_mode_serves_the_loop_designs_images(engine_server, triton, loaded, protocol):
    cases = [dict(seed=7, num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=1),
             dict(seed=9, num_inference_steps=3, guidance_scale=2.0, negative_prompt="blurry", num_images_per_prompt=2)]
    for case in cases:
        served = ask(engine_server, protocol, **case)
        loop = ask(triton, protocol, **case)
        assert served.seeds == loop.seeds
        assert np.abs(served.images.astype(int) - loop.images.astype(int)).max() <= 1
        expected = diffusers_images(loaded(CPU_DTYPE).pipe, "a lighthouse", seed=case["seed"], steps=case["num_inference_steps"],
                                    guidance=case["guidance_scale"], negative=case.get("negative_prompt", ""),
                                    num_images=case["num_images_per_prompt"])
        assert np.abs(served.images.astype(int) - expected.astype(int)).max() <= 1


def test_concurrent_requests_join_the_engine_and_each_gets_its_own_image(engine_server):
    specs = [dict(prompt=f"a city {i}", seed=40 + i, num_inference_steps=2 + i % 3, guidance_scale=2.0 if i % 2 else 1.0,
                  num_images_per_prompt=1 + i % 2, height=128, width=128 if i % 4 else 192) for i in range(8)]
    alone = [ask(engine_server, **dict(spec)).images for spec in specs]
    before = (metric(engine_server, "sdxl_engine_batch_rows_sum"), metric(engine_server, "sdxl_engine_batch_rows_count"))
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda spec: ask(engine_server, **dict(spec)).images, specs))
    for single, concurrent in zip(alone, together):
        assert np.abs(single.astype(int) - concurrent.astype(int)).max() <= 1
    rows = metric(engine_server, "sdxl_engine_batch_rows_sum") - before[0]
    calls = metric(engine_server, "sdxl_engine_batch_rows_count") - before[1]
    print(f"engine: {rows:.0f} UNet rows in {calls:.0f} calls ({rows / calls:.2f} per call)")
    assert rows == sum(s["num_images_per_prompt"] * (2 if s["guidance_scale"] > 1 else 1) * s["num_inference_steps"] for s in specs)


def denoiser_inputs(grpc, steps: int, seed: int = 5, preview_every: int = 0, size: int = 128):
    rng = np.random.default_rng(seed)
    arrays = {
        "prompt_embeds": rng.standard_normal((1, 77, 80)).astype(np.float32),
        "pooled_prompt_embeds": rng.standard_normal((1, 40)).astype(np.float32),
        "seed": np.array([seed], np.int64), "num_inference_steps": np.array([steps], np.int32),
        "guidance_scale": np.array([1.0], np.float32), "height": np.array([size], np.int32),
        "width": np.array([size], np.int32), "num_images_per_prompt": np.array([1], np.int32),
        "preview_every": np.array([preview_every], np.int32),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = grpc.InferInput(name, list(array.shape), {"float32": "FP32", "int64": "INT64", "int32": "INT32"}[str(array.dtype)])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def stream(server, inputs, cancel_after: int | None = None, timeout_s: float = 60):
    """(responses in order as (step, latents), error or None) of one streamed denoiser request."""
    import tritonclient.grpc as grpc

    results: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("denoiser", inputs, enable_empty_final_response=True)
    received, error = [], None
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            result, error = results.get(timeout=timeout_s)
            if error is not None:
                break
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.as_numpy("latents") is not None:
                received.append((int(result.as_numpy("step")[0]), result.as_numpy("latents")))
            if final:
                break
            if cancel_after is not None and len(received) >= cancel_after:
                break
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)
        client.close()
    return received, error


def test_denoiser_streams_previews_in_order_and_the_same_final_latents(engine_server):
    import tritonclient.grpc as grpc

    previews, error = stream(engine_server, denoiser_inputs(grpc, steps=4, preview_every=1))
    assert error is None and [step for step, _ in previews] == [1, 2, 3, 4]
    plain, error = stream(engine_server, denoiser_inputs(grpc, steps=4, preview_every=0))
    assert error is None and [step for step, _ in plain] == [4]
    assert np.array_equal(previews[-1][1], plain[0][1])
    assert not np.array_equal(previews[0][1], previews[-1][1])


@pytest.mark.parametrize("value", [-1, 9])
def test_bad_preview_every_is_refused_naming_it(engine_server, value):
    import tritonclient.grpc as grpc

    received, error = stream(engine_server, denoiser_inputs(grpc, steps=2, preview_every=value))
    assert not received and error is not None
    assert f"preview_every: {value} is not accepted; expected an integer from 0 (no previews) to 8" in str(error)


def test_cancelled_stream_stops_its_work_and_others_go_on(engine_server):
    """8 steps at 1024x1024 (slow steps on a CPU), cancelled by the client after its second preview: the
    engine drops it before its next step (counted as a cancellation, not finished), no UNet sample
    is added for it afterwards, and a request running beside it completes."""
    import tritonclient.grpc as grpc

    cancelled_before = metric(engine_server, "sdxl_engine_cancellations_total")
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(ask, engine_server, seed=77, num_inference_steps=8)
        start = time.monotonic()
        received, error = stream(engine_server, denoiser_inputs(grpc, steps=8, preview_every=1, size=1024), cancel_after=2)
        assert error is None and [step for step, _ in received] == [1, 2]
        cancelled = time.monotonic()
        deadline = cancelled + 30
        while metric(engine_server, "sdxl_engine_cancellations_total") == cancelled_before and time.monotonic() < deadline:
            time.sleep(0.02)
        freed = time.monotonic()
        assert metric(engine_server, "sdxl_engine_cancellations_total") == cancelled_before + 1
        assert other.result(timeout=60).images.shape == (1, 128, 128, 3)  # undisturbed
    samples = metric(engine_server, "sdxl_unet_samples_total")
    time.sleep(1.0)
    assert metric(engine_server, "sdxl_unet_samples_total") == samples  # nothing more runs for it
    print(f"cancel to slot free: {(freed - cancelled) * 1000:.0f} ms (the request ran {cancelled - start:.2f} s)")


def test_engine_metrics_are_exported(engine_server):
    ask(engine_server, seed=1, num_inference_steps=2)
    with urllib.request.urlopen(f"http://127.0.0.1:{engine_server.metrics_port}/metrics") as response:
        text = response.read().decode()
    for name in ("sdxl_engine_batch_rows_bucket", "sdxl_engine_batch_requests_bucket", "sdxl_engine_active_requests",
                 "sdxl_engine_admission_wait_seconds_bucket", "sdxl_engine_cancellations_total", "sdxl_unet_samples_total"):
        assert name in text, name
    request = urllib.request.Request(f"http://{engine_server.http_url}/v2/models/denoiser/config",
                                     headers=engine_server.admin_headers())
    stats = json.loads(urllib.request.urlopen(request).read())
    assert stats["model_transaction_policy"]["decoupled"] is True
