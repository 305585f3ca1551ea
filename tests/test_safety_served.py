"""The safety checker on the real tritonserver (CPU variant, tiny model), over HTTP, gRPC and the
stream: nsfw_detected and the images equal diffusers' StableDiffusionSafetyChecker on the served
images, under each policy the deployment can set; off by default; a checker that cannot load fails
the server's start."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from helpers import stop_quickly
from test_safety import diffusers_check

from client import generate
from client.__main__ import main as client_main
from export.sources import load_safety_checker
from serving.server import ServerError, TritonServer, free_ports

PROTOCOLS = ["http", "grpc"]
CASES = [dict(prompt="a photo of a cat", seed=seed, num_inference_steps=2, height=128, width=128, num_images_per_prompt=4)
         for seed in (0, 1)]


def ask(server, protocol="grpc", case=0, **options):
    options = {**CASES[case], **options}
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return generate(options.pop("prompt"), url=url, protocol=protocol, **options)


@pytest.fixture(scope="module")
def checker(tiny_dir):
    return load_safety_checker(str(tiny_dir / "safety_checker"))


@pytest.fixture(scope="module")
def raw(triton):
    """Each case's images from the default deployment (no checker), and nsfw_detected there: None."""
    results = [ask(triton, case=case) for case in range(len(CASES))]
    assert all(result.nsfw_detected is None for result in results)
    return [result.images for result in results]


@pytest.fixture(scope="module")
def checking(triton, raw):
    """The session's server with its postprocess and sdxl_stream loaded again with `policy(name)`:
    their config's safety_checker parameter set to it, as a deployment's config sets it (Triton's
    load API with a config, explicit model control); loaded back as they were at the end. After
    `raw`, which the default deployment answers."""
    import tritonclient.http as http

    client = http.InferenceServerClient(triton.http_url)
    admin = triton.admin_headers()
    original = {model: client.get_model_config(model, headers=admin) for model in ("postprocess", "sdxl_stream")}

    current = []

    def policy(name: str):
        if current != [name]:  # a reload costs seconds (the stream's 4 instances end one by one)
            for model, config in original.items():
                changed = json.loads(json.dumps(config))
                changed.setdefault("parameters", {})["safety_checker"] = {"string_value": name}
                client.load_model(model, config=json.dumps(changed), headers=admin)
            current[:] = [name]
        return triton

    try:
        yield policy
    finally:
        for model, config in original.items():
            client.load_model(model, config=json.dumps(config), headers=admin)
        client.close()


def test_default_deployment_sends_an_empty_nsfw_detected(triton):
    """No checker: the output is there for a client that asks for it, with no flags (shape [0]). Before
    the tests that load the session's server with a checker (`checking`)."""
    import tritonclient.grpc as grpc

    from client import build_inputs

    inputs = build_inputs("grpc", "a cat", seed=1, num_inference_steps=1, height=128, width=128)
    client = grpc.InferenceServerClient(triton.grpc_url)
    try:
        result = client.infer("ensemble_sdxl", inputs, outputs=[grpc.InferRequestedOutput("nsfw_detected")])
    finally:
        client.close()
    assert result.as_numpy("nsfw_detected").shape == (0,)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_black_policy_flags_and_images_equal_diffusers(checking, checker, raw, protocol):
    server = checking("black")
    flagged = 0
    for case, images in enumerate(raw):
        expected_images, expected_flags = diffusers_check(checker, images)
        result = ask(server, protocol, case)
        assert result.nsfw_detected == expected_flags
        assert np.array_equal(result.images, expected_images)
        flagged += sum(expected_flags)
    assert 0 < flagged < 4 * len(raw)  # both kinds among the served images: the test has teeth
    png = ask(server, protocol, 0, output_format="png")  # the files are the checked images
    assert np.array_equal(np.stack([np.asarray(Image.open(io.BytesIO(f))) for f in png.encoded_images]),
                          diffusers_check(checker, raw[0])[0])


def test_stream_final_response_carries_the_flags(checking, checker, raw):
    server = checking("black")
    updates = list(ask(server, "grpc", 0, stream=True, preview_every=1))
    assert all(update.nsfw_detected is None for update in updates[:-1])  # previews are not checked
    expected_images, expected_flags = diffusers_check(checker, raw[0])
    assert updates[-1].nsfw_detected == expected_flags and np.array_equal(updates[-1].images, expected_images)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_flag_policy_returns_the_images_with_their_flags(checking, checker, raw, protocol):
    server = checking("flag")
    for case, images in enumerate(raw):
        result = ask(server, protocol, case)
        assert result.nsfw_detected == diffusers_check(checker, images)[1]
        assert np.array_equal(result.images, images)


def test_cli_prints_each_images_verdict(checking, checker, raw, tmp_path, capsys):
    server = checking("flag")
    case = CASES[0]
    code = client_main([case["prompt"], "--url", server.http_url, "--seed", str(case["seed"]), "--steps", "2",
                        "--height", "128", "--width", "128", "--num-images", "4", "-o", str(tmp_path / "cat.png")])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "cat" in line]
    verdicts = ["nsfw detected" if flag else "safety check passed" for flag in diffusers_check(checker, raw[0])[1]]
    assert [line.rsplit("bytes  ", 1)[1] for line in lines] == verdicts


def test_a_checker_that_cannot_load_fails_the_start(exported, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(exported("fp32"), repository)
    (repository / "safety_checker" / "1" / "model.onnx").write_bytes(b"not an ONNX graph")
    server = TritonServer(repository, "cpu", *free_ports(3), log_file=tmp_path / "log")
    with pytest.raises(ServerError, match="model safety_checker failed to load: .*INVALID_PROTOBUF"):  # from the log, at once
        server.start(timeout_s=240)
    stop_quickly(server)
    assert "safety_checker" in (tmp_path / "log").read_text()
