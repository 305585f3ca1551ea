"""Request traces (TritonServer(trace_file=...), `--trace-file`): a traced request shows its BLS callees under it
(serving/triton/common.py `traced`), read back by benchmarks/traces.py; the server's command line and flags."""

from __future__ import annotations

import json
import time

import pytest
from reference import sample_image

from benchmarks.security import http_call
from benchmarks.traces import read_traces
from client import generate, generate_session
from serving.server import TritonServer
from serving.server import main as server_main

PROMPT = "a lighthouse in the fog"


def trace_setting(server, **settings) -> dict:
    """Triton's trace settings (an admin API: the key goes with the call), changed by `settings` if any."""
    status, text = http_call(server.http_url, "POST" if settings else "GET", "/v2/trace/setting", settings or None,
                             key=server.admin_key)
    assert status == 200, text
    return json.loads(text)


def traced(server, model: str, send):
    """The request to `model` that `send()` made, traced: every request traced at level TIMESTAMPS while it
    runs (test_security turns the shared server's tracing off through the API: the settings are put back as
    they were), each trace written as it ends (the shared server's: none is held back from before)."""
    previous = trace_setting(server)
    assert previous["log_frequency"] == "1"
    trace_file = server.trace_file
    before = {root.id for root in read_traces(trace_file)}
    trace_setting(server, trace_level=["TIMESTAMPS"], trace_rate="1")
    try:
        send()
    finally:
        trace_setting(server, trace_level=previous["trace_level"], trace_rate=previous["trace_rate"])
    deadline = time.monotonic() + 10
    while True:  # Triton writes a trace once its request and its callees are done
        found = [root for root in read_traces(trace_file) if root.id not in before and root.model == model]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{len(found)} new traces of {model}"
            return found[0]
        time.sleep(0.1)


def models(request) -> list[str]:
    return sorted(child.model for child in request.children)


def test_a_session_frame_is_traced_with_its_callees(triton):
    stream = traced(triton, "sdxl_stream", lambda: list(generate_session(
        [{"image": sample_image(128, 128, seed=3)}], url=triton.grpc_url, prompt=PROMPT, num_inference_steps=2, strength=0.5,
        seed=5)))
    assert models(stream) == ["denoiser", "text_encoder", "vae_decoder"]
    assert models(stream.child("denoiser")) == ["vae_encoder"]  # the image encoded for it, under it
    encoder = stream.child("denoiser").child("vae_encoder")
    assert stream.ns["COMPUTE_START"] < encoder.ns["REQUEST_START"] < encoder.ns["REQUEST_END"] < stream.ns["GRPC_SEND_END"]
    assert 0 < encoder.compute_ms <= encoder.span_ms


def test_an_ensemble_request_is_traced_down_to_the_loops_calls(triton):
    ensemble = traced(triton, "ensemble_sdxl", lambda: generate(PROMPT, url=triton.http_url, num_inference_steps=2, seed=5,
                                                               strength=0.5, image=sample_image(128, 128, seed=4)))
    scheduler = ensemble.child("scheduler")
    assert {"tokenizer", "text_encoder", "scheduler"} <= set(models(ensemble))
    assert models(scheduler) == ["unet", "vae_encoder"]  # one UNet call per step (strength 0.5 of 2 steps: one)


def test_the_trace_settings_reach_tritonserver(tmp_path):
    server = TritonServer(tmp_path, trace_file=tmp_path / "t.json", trace_rate=7, trace_log_frequency=3)
    assert server.trace_args() == ["--trace-config", f"triton,file={tmp_path / 't.json'}", "--trace-config",
                                   "triton,log-frequency=3", "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=7"]
    assert TritonServer(tmp_path).trace_args() == []


def test_a_bad_trace_rate_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exited:
        server_main(["--trace-file", "t.json", "--trace-rate", "0"])
    assert exited.value.code == 2 and "--trace-rate 0: expected a whole number, at least 1" in capsys.readouterr().err
