"""ensemble_sdxl on a real tritonserver: parity with diffusers, determinism, batching, errors."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from reference import diffusers_images

from client import ClientError, generate
from client.__main__ import main as client_main

# Served graphs (ONNX Runtime) against diffusers (PyTorch) in the same dtype on the same weights.
# fp16: both round to fp16 at every layer, differently (ONNX Runtime upcasts some ops to fp32),
# through the UNet steps and the VAE: measured at most 1 level, 0.055 on average; 2x headroom.
# fp32: only summation order differs: measured at most 1 level (a value on a rounding boundary)
# on few pixels.
PIXEL_MAX_TOLERANCE = {"fp16": 2, "fp32": 1}
PIXEL_MEAN_TOLERANCE = {"fp16": 0.1, "fp32": 0.01}

PARITY_CASES = {
    "1 image, 4 steps, no CFG": dict(prompt="a photo of an astronaut riding a horse", seed=42, steps=4, guidance=1.0,
                                     negative="", height=128, width=128, num_images=1),
    "2 images, CFG, negative prompt": dict(prompt="a watercolor painting of a lighthouse", seed=7, steps=4, guidance=1.8,
                                           negative="blurry, low quality", height=128, width=128, num_images=2),
    "non-square, 3 steps": dict(prompt="a futuristic city at night", seed=123, steps=3, guidance=1.0, negative="",
                                height=128, width=256, num_images=1),
    "CFG, empty negative prompt": dict(prompt="a red rose", seed=5, steps=2, guidance=1.5, negative="",
                                       height=192, width=128, num_images=1),
}


def request(triton, case: dict, protocol: str = "http"):
    url = triton.http_url if protocol == "http" else triton.grpc_url
    return generate(case["prompt"], url=url, protocol=protocol, seed=case["seed"], num_inference_steps=case["steps"],
                    guidance_scale=case["guidance"], negative_prompt=case["negative"] or None, height=case["height"],
                    width=case["width"], num_images_per_prompt=case["num_images"])


@pytest.mark.parametrize("case", PARITY_CASES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_served_image_matches_diffusers(serve, loaded, dtype, case):
    """Every exported dtype is served end to end (the configs follow the export) and matches diffusers."""
    spec = PARITY_CASES[case]
    result = request(serve(dtype), spec)
    expected = diffusers_images(loaded(dtype).pipe, spec["prompt"], **{k: v for k, v in spec.items() if k != "prompt"})
    assert result.images.shape == expected.shape and result.images.dtype == np.uint8
    assert result.seeds == [spec["seed"] + i for i in range(spec["num_images"])]
    difference = np.abs(result.images.astype(int) - expected.astype(int))
    print(f"{dtype} {case}: max {difference.max()}, mean {difference.mean():.4f}")
    assert difference.max() <= PIXEL_MAX_TOLERANCE[dtype], f"max pixel difference {difference.max()}"
    assert difference.mean() <= PIXEL_MEAN_TOLERANCE[dtype], f"mean pixel difference {difference.mean():.3f}"


def test_same_seed_same_image_across_calls_and_protocols(triton):
    case = PARITY_CASES["1 image, 4 steps, no CFG"]
    first, again, grpc = request(triton, case), request(triton, case), request(triton, case, "grpc")
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.images, grpc.images)
    other = request(triton, {**case, "seed": case["seed"] + 100})
    assert np.abs(other.images.astype(int) - first.images.astype(int)).mean() > 5


def test_image_i_of_a_batch_is_the_single_request_with_seed_plus_i(triton):
    case = {**PARITY_CASES["1 image, 4 steps, no CFG"], "num_images": 3, "seed": 1000}
    batch = request(triton, case)
    assert batch.seeds == [1000, 1001, 1002]
    for i in (0, 2):
        single = request(triton, {**case, "num_images": 1, "seed": 1000 + i})
        # Equal up to the kernels' batch-size-dependent rounding (a UNet batch of 3 vs 1).
        difference = np.abs(single.images[0].astype(int) - batch.images[i].astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_defaults_apply_and_random_seeds_are_returned(triton):
    result = generate("a cat", url=triton.http_url, height=128, width=128)
    assert result.images.shape == (1, 128, 128, 3) and len(result.seeds) == 1 and 0 <= result.seeds[0] < 2**32
    assert generate("a cat", url=triton.http_url, height=128, width=128).seeds != result.seeds


def unet_statistics(triton) -> tuple[int, int]:
    request = urllib.request.Request(f"http://{triton.http_url}/v2/models/unet/stats", headers=triton.admin_headers())
    with urllib.request.urlopen(request) as response:
        stats = json.load(response)["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


def test_concurrent_requests_share_unet_batches(triton):
    before = unet_statistics(triton)
    cases = [{**PARITY_CASES["1 image, 4 steps, no CFG"], "seed": 500 + i, "num_images": 1 + i % 2} for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda case: request(triton, case), cases))
    assert [r.seeds[0] for r in results] == [c["seed"] for c in cases]
    inferences, executions = (a - b for a, b in zip(unet_statistics(triton), before))
    assert inferences == sum(4 * c["num_images"] for c in cases)  # samples through the UNet: 4 steps each
    assert executions < inferences, f"no batching: {executions} UNet executions for {inferences} samples"


BAD_REQUESTS = [
    (dict(num_inference_steps=0), "num_inference_steps: 0 is not accepted; expected an integer from 1 to 8"),
    (dict(num_inference_steps=9), "num_inference_steps: 9 is not accepted; expected an integer from 1 to 8"),
    (dict(guidance_scale=-1.0), "guidance_scale: -1.0 is not accepted; expected a number from 0 to 20"),
    (dict(guidance_scale=float("nan")), "guidance_scale: nan is not accepted"),
    (dict(height=100), "height: 100 is not accepted; expected a multiple of 64 from 128 to 1536"),
    (dict(width=64), "width: 64 is not accepted; expected a multiple of 64 from 128 to 1536"),
    (dict(width=2048), "width: 2048 is not accepted; expected a multiple of 64 from 128 to 1536"),
    (dict(num_images_per_prompt=5), "num_images_per_prompt: 5 is not accepted; expected an integer from 1 to 4"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt: 0 is not accepted; expected an integer from 1 to 4"),
    (dict(seed=-1), "seed: -1 is not accepted; expected an integer from 0 to 2**63 - 1"),
    (dict(prompt=b"\xff\xfe bad bytes"), "prompt: b'\\xff\\xfe bad bytes' is not accepted; expected UTF-8 text"),
    (dict(negative_prompt=b"\xc3", guidance_scale=2.0), "negative_prompt: b'\\xc3' is not accepted; expected UTF-8 text"),
    (dict(prompt=None), "prompt: missing; expected a UTF-8 string (BYTES, shape [1]); this input is required"),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("bad,message", BAD_REQUESTS, ids=[m.split(";")[0] for _, m in BAD_REQUESTS])
def test_bad_input_gets_invalid_arg(triton, bad, message, protocol):
    options = {"height": 128, "width": 128, "prompt": "a cat", **bad}
    prompt = options.pop("prompt")
    url = triton.http_url if protocol == "http" else triton.grpc_url
    with pytest.raises(ClientError) as error:
        generate(prompt, url=url, protocol=protocol, **options)
    assert message in str(error.value)
    assert error.value.status == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT")
    assert triton.is_ready()


def test_server_is_undisturbed_by_bad_requests(triton):
    good = PARITY_CASES["1 image, 4 steps, no CFG"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        bad = [pool.submit(generate, "x", url=triton.http_url, height=100) for _ in range(3)]
        ok = pool.submit(request, triton, good)
        assert ok.result().images.shape == (1, 128, 128, 3)
        assert all(isinstance(f.exception(), ClientError) for f in bad)


def test_failed_unet_call_fails_the_request_not_the_server(triton):
    import tritonclient.http as http

    admin = http.InferenceServerClient(triton.http_url)
    try:
        admin.unload_model("unet", headers=triton.admin_headers())
        with pytest.raises(ClientError) as error:
            generate("a cat", url=triton.http_url, height=128, width=128, seed=1)
        assert "unet: " in str(error.value)
        assert triton.is_ready() or admin.is_model_ready("ensemble_sdxl")
    finally:
        admin.load_model("unet", headers=triton.admin_headers())
        admin.close()
    assert generate("a cat", url=triton.http_url, height=128, width=128, seed=1).images.shape == (1, 128, 128, 3)


def test_client_cli_writes_numbered_pngs(triton, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "cat.png"
    code = client_main(["a cat", "-o", str(out), "--url", triton.grpc_url, "--protocol", "grpc", "--seed", "9",
                        "--num-images", "2", "--height", "128", "--width", "192", "--steps", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    for i in range(2):
        path = tmp_path / f"cat_{i}.png"
        assert Image.open(path).size == (192, 128)
        assert f"{path}  seed {9 + i}  192x128" in printed
    assert "2 image(s) in" in printed


def test_client_cli_reports_errors(triton, capsys):
    assert client_main(["a cat", "--url", triton.http_url, "--height", "100"]) == 1
    assert "error: " in capsys.readouterr().err
    assert client_main(["a cat", "--url", "127.0.0.1:9", "--timeout", "5"]) == 1
    assert "cannot reach the server" in capsys.readouterr().err or "error:" in capsys.readouterr().err


def metrics(triton) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{triton.metrics_port}/metrics") as response:
        return response.read().decode()


def metric_value(text: str, name: str) -> float:
    """The sum over the metric's series (sdxl_unet_samples_total has one per model that counts it)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    if not values:
        raise AssertionError(f"{name} not exported")
    return sum(values)


def test_custom_and_standard_metrics(triton):
    before = metrics(triton)
    generate("a cat", url=triton.http_url, height=128, width=128, seed=3, num_inference_steps=3,
             guidance_scale=1.5, num_images_per_prompt=2)
    after = metrics(triton)
    assert 'nv_inference_count{model="unet"' in after  # Triton's own
    assert metric_value(after, "sdxl_unet_samples_total") - metric_value(before, "sdxl_unet_samples_total") == 3 * 4
    assert metric_value(after, "sdxl_unet_step_latency_seconds_count") - metric_value(before, "sdxl_unet_step_latency_seconds_count") == 3
    assert metric_value(after, "sdxl_steps_per_request_sum") - metric_value(before, "sdxl_steps_per_request_sum") == 3
    assert metric_value(after, "sdxl_unet_request_batch_size") == 4
    assert metric_value(after, "sdxl_scheduler_requests_in_flight") == 0
