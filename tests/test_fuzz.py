"""Property-based fuzzing of the endpoint `ensemble_sdxl` on the real tritonserver (hypothesis).

The generators and the oracle are `benchmarks/fuzz.py`'s (which runs them at length: `python -m
benchmarks.fuzz`); here each class of request, and each variant of it (every endpoint input, every
way a raw body is broken), runs a few deterministic examples over HTTP and gRPC against the session's
server. For every case: a bad request gets HTTP 4xx / gRPC INVALID_ARGUMENT with a message naming
what is wrong, a valid one its images; no 5xx but Triton's own, allow-listed with their exact
messages (`fuzz.TRITON_5XX`); no hang; the server stays ready. Afterwards a fixed request gives the
same image bytes as before the fuzzing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from benchmarks import fuzz

# Examples per (class, variant): refusals cost about a millisecond each, served requests 0.05-0.3 s.
EXAMPLES = {"valid_small": 12, "guidance_out_of_range": 30, "missing_prompt": 20, "unknown_input": 30, "input_name_nul": 20,
            "request_parameter": 30}
EXAMPLES_PER_VARIANT = 10
TIMEOUT_S = 30  # per call: a hang fails the case

CASES = [pytest.param(name, variant, id=f"{name}-{variant}" if variant else name,
                      marks=[pytest.mark.xfail(strict=True, reason=f"serving bug: {fuzz.SERVING_BUGS[name]}")]
                      if name in fuzz.SERVING_BUGS else [])
         for name in fuzz.WEIGHTS for variant in fuzz.VARIANTS.get(name, (None,))]


@pytest.fixture(scope="module")
def fuzzer(triton):
    client = fuzz.Fuzzer(triton.http_url, triton.grpc_url, triton.admin_headers(), timeout_s=TIMEOUT_S)
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(fuzzer):
    """The fixed request's image before any fuzzing (every fuzz test asks for it, so it comes first)."""
    return fuzzer.reference_image("http")


@pytest.mark.parametrize("name,variant", CASES)
def test_every_request_gets_its_answer(fuzzer, reference, name, variant):
    shrink = () if name in fuzz.SERVING_BUGS else (Phase.shrink,)  # a known bug's first failing case is enough
    @settings(max_examples=EXAMPLES.get(name, EXAMPLES_PER_VARIANT), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate, *shrink))
    @given(fuzzer.strategies[name](variant))
    def check(case):
        answer = fuzzer.send(case)
        _, problem = fuzz.judge(case, answer)
        assert problem is None, f"{problem}\nreproducer: {fuzz.describe(case)}"
        assert fuzzer.is_ready(), f"server not ready after {fuzz.describe(case)}"

    check()


def test_server_ready_and_image_unchanged_after_fuzzing(fuzzer, reference):
    assert fuzzer.is_ready()
    for protocol in ("http", "grpc"):
        image = fuzzer.reference_image(protocol)
        assert image.shape == (1, 128, 128, 3) and image.dtype == np.uint8
        assert np.array_equal(image, reference), f"{protocol}: the fixed request's image changed during the fuzzing"
