"""Bad days on the real server: overload, queue timeouts, request limits and cancellation
(serving/admission.py); a killed model process and SIGTERM are tests/test_supervisor.py's. Figures
(refusal latency, the queue bound, soak) are benchmarks: benchmarks/faults.py, benchmarks/soak.py."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from client import ClientError, generate

SLOW = dict(height=256, width=256, num_inference_steps=8)  # about 0.4 s alone on this machine's CPU variant


def attempt(url: str, protocol: str = "grpc", **options):
    """(outcome, message): "ok", or the client's status string, with the server's message."""
    try:
        generate("a lighthouse", url=url, protocol=protocol, seed=1, timeout_s=120, **options)
        return "ok", ""
    except ClientError as error:
        return str(error.status), str(error)


def burst(url: str, count: int, protocol: str = "grpc", **options) -> list[tuple[str, str]]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: attempt(url, protocol, **{**SLOW, **options}), range(count)))


def scheduler_instances(triton) -> int:
    from contract.configs import read_config

    return sum(group.count for group in read_config(triton.repository, "scheduler", "cpu").instance_group)


def test_overload_is_refused_with_the_bound_and_admitted_requests_finish(triton):
    results = burst(triton.grpc_url, 24)
    refused = [message for outcome, message in results if outcome != "ok"]
    admitted = len(results) - len(refused)
    assert refused, "24 simultaneous slow requests against 4 loops + a queue of 4: some must be refused"
    assert admitted >= scheduler_instances(triton)
    for message in refused:  # every failure is a refusal, none a broken request
        assert "server at capacity:" in message and "(4 denoising loops + max_queue_size 4); retry later" in message, message
    assert {outcome for outcome, _ in results if outcome != "ok"} == {"StatusCode.UNAVAILABLE"}


def test_overload_over_http_is_503(triton):
    statuses = {outcome for outcome, _ in burst(triton.http_url, 24, protocol="http")}
    assert statuses <= {"ok", "503"} and "503" in statuses


def test_queue_timeout_refuses_requests_that_waited_too_long(triton):
    results = burst(triton.grpc_url, 8, queue_timeout_ms=1)
    timed_out = [message for outcome, message in results if outcome != "ok"]
    assert timed_out, "8 slow requests on 4 loops: some wait for a slot longer than 1 ms"
    for message in timed_out:
        assert "ms for a denoising slot, over its queue_timeout_ms=1; retry later" in message, message
    assert attempt(triton.grpc_url, queue_timeout_ms=60_000, height=128, width=128)[0] == "ok"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_queue_timeout_parameter_is_invalid(triton, protocol):
    outcome, message = attempt(triton.http_url if protocol == "http" else triton.grpc_url, protocol, queue_timeout_ms=-1)
    assert outcome in ("400", "StatusCode.INVALID_ARGUMENT")
    assert "queue_timeout_ms: -1 is not accepted" in message


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_oversize_texts_are_refused_before_any_work(triton, field):
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a cat"]},
                       {"name": "guidance_scale", "datatype": "FP32", "shape": [1], "data": [1.5]}]}
    text = "x" * 1_000_000
    if field == "prompt":
        body["inputs"][0]["data"] = [text]
    else:
        body["inputs"].append({"name": "negative_prompt", "datatype": "BYTES", "shape": [1], "data": [text]})
    request = urllib.request.Request(f"http://{triton.http_url}/v2/models/ensemble_sdxl/infer", json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 400
    message = json.loads(error.value.read())["error"]
    assert f"{field}: '<1000000 bytes>' is not accepted; expected UTF-8 text of at most 4096 bytes (max_prompt_bytes)" in message


def test_a_deadline_stops_the_loop_of_a_directly_called_scheduler(triton):
    """Triton tells a model called directly that its gRPC client gave up (is_cancelled): the loop
    stops at the next step. Through the ensemble it does not (docs/reliability.md)."""
    import tritonclient.grpc as grpc
    from test_serving import metric_value, metrics

    from contract.configs import read_config, repository_dtype

    config = read_config(triton.repository, "scheduler", "cpu")
    widths = {t.name: t.dims[-1] for t in config.input}
    dtype, triton_dtype = (np.float16, "FP16") if repository_dtype(triton.repository) == "fp16" else (np.float32, "FP32")
    inputs = []
    for name, value, kind in (("prompt_embeds", np.zeros([1, 77, widths["prompt_embeds"]], dtype), triton_dtype),
                              ("pooled_prompt_embeds", np.zeros([1, widths["pooled_prompt_embeds"]], dtype), triton_dtype),
                              ("num_inference_steps", np.array([8], np.int32), "INT32"),
                              ("height", np.array([1024], np.int32), "INT32"), ("width", np.array([1024], np.int32), "INT32")):
        tensor = grpc.InferInput(name, list(value.shape), kind)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client = grpc.InferenceServerClient(triton.grpc_url)
    before = metric_value(metrics(triton), "sdxl_unet_samples_total")
    with pytest.raises(Exception, match="Deadline"):
        client.infer("scheduler", inputs, client_timeout=0.3)
    time.sleep(3)  # the loop notices at its next step
    steps_run = metric_value(metrics(triton), "sdxl_unet_samples_total") - before
    assert steps_run < 8, f"the loop ran all {steps_run:.0f} steps after its client's deadline"
    client.close()
