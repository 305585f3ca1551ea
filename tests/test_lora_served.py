"""Per-request LoRAs served end to end on a real tritonserver: LoRAs added to the library while the
server runs, named per request (lora_names, lora_scales) over HTTP, gRPC and the stream, each
image equal to diffusers' `load_lora_weights` + `set_adapters` on the same base and seeds; requests
with different LoRAs at once each equal to their solo run; bad LoRA inputs refused by name."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import ENGINE_ONLY, start_engine_server, stop_quickly
from reference import diffusers_images

from client import ClientError, generate, loras
from contract.configs import CPU_DTYPE
from export import lora as library
from export.sources import load_pipeline
from export.tiny import write_style_lora

PROMPT = "a lighthouse"
CASE = dict(seed=5, num_inference_steps=3, height=128, width=128)


@pytest.fixture(scope="module")
def served_loras(triton, exported, loaded, tmp_path_factory):
    """Two style LoRAs added to the running server's library: `ink_a` (UNet + both text encoders)
    and `ink_b` (UNet attention only, rank 2)."""
    pipe = loaded(CPU_DTYPE).pipe
    root = tmp_path_factory.mktemp("served_loras")
    files = {"ink_a": write_style_lora(pipe, root / "a", seed=21, scale=0.08),
             "ink_b": write_style_lora(pipe, root / "b", seed=22, rank=2, scale=0.1, text_encoders=False,
                                       unet_targets=["to_q", "to_k", "to_v", "to_out.0"])}
    repository = exported(CPU_DTYPE)
    for name, path in files.items():
        if name not in library.loras.installed(repository):
            library.add(repository, name, str(path), 64)
    return files


REFERENCES: dict[str, np.ndarray] = {}  # diffusers' images of a case both protocols send


def reference(loaded, files, adapters, **case):
    pipe = load_pipeline(loaded(CPU_DTYPE).sources, CPU_DTYPE).pipe
    for name, _ in adapters:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    if adapters:
        pipe.set_adapters([name for name, _ in adapters], adapter_weights=[scale for _, scale in adapters])
    return diffusers_images(pipe, PROMPT, seed=case["seed"], steps=case["num_inference_steps"], height=case["height"],
                            width=case["width"], guidance=case.get("guidance_scale", 1.0),
                            num_images=case.get("num_images_per_prompt", 1))


def ask(server, protocol="grpc", loras=None, **case):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return generate(PROMPT, url=url, protocol=protocol, loras=loras, **{**CASE, **case})


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_stacked_weighted_loras_equal_diffusers(triton, served_loras, loaded, protocol):
    adapters = [("ink_a", 0.7), ("ink_b", -1.5)]
    served = ask(triton, protocol, loras=adapters, guidance_scale=2.0, num_images_per_prompt=2)
    if "stacked" not in REFERENCES:  # one diffusers run (a pipeline loaded with both LoRAs) for both protocols
        REFERENCES["stacked"] = reference(loaded, served_loras, adapters, **{**CASE, "guidance_scale": 2.0, "num_images_per_prompt": 2})
    assert np.abs(served.images.astype(int) - REFERENCES["stacked"].astype(int)).max() <= 1
    plain = ask(triton, protocol, guidance_scale=2.0, num_images_per_prompt=2)
    assert np.abs(served.images.astype(int) - plain.images.astype(int)).mean() > 2  # the LoRAs change the image


def test_unet_calls_without_loras_run_the_plain_unet(triton, served_loras):
    """unet_lora runs only the UNet calls of requests that name LoRAs (docs/loras.md, two graphs)."""
    import tritonclient.http as httpclient

    def samples() -> dict[str, int]:
        client = httpclient.InferenceServerClient(triton.http_url)
        try:
            stats = client.get_inference_statistics(headers=triton.admin_headers())["model_stats"]
        finally:
            client.close()
        return {s["name"]: int(s["inference_count"]) for s in stats if s["name"] in ("unet", "unet_lora")}

    before = samples()
    ask(triton)
    plain = samples()
    assert plain["unet"] == before["unet"] + CASE["num_inference_steps"] and plain["unet_lora"] == before["unet_lora"]
    ask(triton, loras=[("ink_b", 1.0)])
    named = samples()
    assert named["unet_lora"] == plain["unet_lora"] + CASE["num_inference_steps"] and named["unet"] == plain["unet"]


def test_a_text_encoder_lora_alone_equals_diffusers(triton, served_loras, loaded):
    served = ask(triton, loras=[("ink_a", 1.0)], width=192)
    expected = reference(loaded, served_loras, [("ink_a", 1.0)], **{**CASE, "width": 192})
    assert np.abs(served.images.astype(int) - expected.astype(int)).max() <= 1


def test_concurrent_requests_with_different_loras_each_equal_their_solo_run(triton, served_loras):
    specs = [[("ink_a", 1.0)], [("ink_b", 0.5)], None, [("ink_b", 1.0), ("ink_a", 0.3)]]
    alone = [ask(triton, loras=spec).images for spec in specs]
    with ThreadPoolExecutor(len(specs)) as pool:
        together = list(pool.map(lambda spec: ask(triton, loras=spec).images, specs))
    for single, concurrent in zip(alone, together):
        assert np.abs(single.astype(int) - concurrent.astype(int)).max() <= 1
    again = ask(triton, loras=specs[0]).images  # A after B (and the rest): exactly A again
    np.testing.assert_array_equal(again, alone[0])


def test_the_stream_serves_loras(triton, served_loras):
    adapters = [("ink_a", 0.7), ("ink_b", -1.5)]
    final = [update for update in generate(PROMPT, url=triton.grpc_url, protocol="grpc", stream=True, loras=adapters,
                                           **CASE) if update.final][0]
    assert np.abs(final.images.astype(int) - ask(triton, loras=adapters).images.astype(int)).max() <= 1


def test_a_removed_lora_is_refused_and_an_added_one_served_without_a_restart(triton, served_loras, exported):
    repository = exported(CPU_DTYPE)
    library.add(repository, "ink_late", str(served_loras["ink_b"]), 64)
    assert "ink_late" in [entry["name"] for entry in loras(triton.http_url)]
    late = ask(triton, loras=[("ink_late", 1.0)]).images
    np.testing.assert_array_equal(late, ask(triton, loras=[("ink_b", 1.0)]).images)
    library.remove(repository, "ink_late")
    with pytest.raises(ClientError, match="lora_names: 'ink_late' is not in the LoRA library"):
        ask(triton, loras=[("ink_late", 1.0)])
    assert "ink_late" not in [entry["name"] for entry in loras(triton.grpc_url, "grpc")]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("loras, message", [
    ([("no_such_lora", 1.0)], r"lora_names: 'no_such_lora' is not in the LoRA library \(installed: .*ink_a"),
    ([("ink_a", 1.0)] * 2, r"lora_names: \['ink_a', 'ink_a'\] names a LoRA twice"),
    ([(f"x{i}", 1.0) for i in range(5)], r"lora_names: 5 names is not accepted; expected at most 4 LoRAs per request"),
    ([("../../etc", 1.0)], r"lora_names: '../../etc' is not a LoRA name; expected 1 to 64 of"),
    ([("", 1.0)], r"lora_names: '' is not a LoRA name"),
    ([("x" * 5000, 1.0)], r"lora_names: 'xxxx.*\.\.\.' is not a LoRA name"),
    ([("ink_a", math.nan)], r"lora_scales: nan is not accepted; expected a finite number from -4 to 4"),
    ([("ink_a", math.inf)], r"lora_scales: inf is not accepted"),
    ([("ink_a", 9.0)], r"lora_scales: 9.0 is not accepted; expected a finite number from -4 to 4"),
])
def test_bad_lora_inputs_are_refused_by_name(triton, served_loras, protocol, loras, message):
    with pytest.raises(ClientError, match=message) as caught:
        ask(triton, protocol, loras=loras)
    assert caught.value.status in ("400", "StatusCode.INVALID_ARGUMENT")


def test_scales_must_match_the_names(triton, served_loras):
    import tritonclient.grpc as grpcclient

    def send(names, scales):
        inputs = [grpcclient.InferInput("prompt", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
        if names is not None:
            inputs.append(grpcclient.InferInput("lora_names", [len(names)], "BYTES"))
            inputs[-1].set_data_from_numpy(np.array([n.encode() for n in names], dtype=np.object_))
        if scales is not None:
            inputs.append(grpcclient.InferInput("lora_scales", [len(scales)], "FP32"))
            inputs[-1].set_data_from_numpy(np.array(scales, dtype=np.float32))
        for name, value in (("height", 128), ("width", 128)):
            inputs.append(grpcclient.InferInput(name, [1], "INT32"))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=np.int32))
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        try:
            client.infer("ensemble_sdxl", inputs)
        finally:
            client.close()

    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="lora_scales: 1 scales for 2 names in lora_names"):
        send(["ink_a", "ink_b"], [0.5])
    with pytest.raises(InferenceServerException, match="lora_scales: 1 scales without lora_names"):
        send(None, [0.5])
    send(["ink_a"], None)  # default scale 1.0


@pytest.fixture(scope="module")
def engine_server(served_loras, exported, tmp_path_factory):
    """The continuous-batching engine on a copy of the repository and its library: a server that
    starts with a library beside its repository (ensemble_sdxl's models alone: the test sends it nothing else)."""
    server = start_engine_server(exported(CPU_DTYPE), tmp_path_factory, "lora_engine", ENGINE_ONLY)
    yield server
    stop_quickly(server)


def test_the_engine_batches_requests_with_different_loras_and_serves_the_loops_images(engine_server, triton, served_loras):
    specs = [[("ink_a", 0.7), ("ink_b", -1.5)], [("ink_b", 1.0)], None]
    with ThreadPoolExecutor(len(specs)) as pool:
        together = list(pool.map(lambda spec: ask(engine_server, loras=spec).images, specs))
    for spec, images in zip(specs, together):
        assert np.abs(images.astype(int) - ask(triton, loras=spec).images.astype(int)).max() <= 1


def test_the_client_cli_names_loras(triton, served_loras, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from contract.layout import REPO_ROOT

    out = tmp_path / "ink.png"
    result = subprocess.run([sys.executable, "-m", "client", PROMPT, "-o", str(out), "--url", triton.grpc_url, "--protocol",
                             "grpc", "--seed", "5", "--steps", "3", "--height", "128", "--width", "128",
                             "--lora", "ink_a:0.7", "--lora", "ink_b:-1.5"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(out)), ask(triton, loras=[("ink_a", 0.7), ("ink_b", -1.5)]).images[0])
    bad = subprocess.run([sys.executable, "-m", "client", PROMPT, "--url", triton.grpc_url, "--protocol", "grpc",
                          "--lora", "ink_a:lots"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lora 'ink_a:lots': bad scale 'lots'" in bad.stderr


def test_the_client_lists_the_library(triton, served_loras, exported, tmp_path):
    import subprocess
    import sys

    from contract.layout import REPO_ROOT

    served = {entry["name"]: entry for entry in loras(triton.grpc_url, "grpc")}
    installed = {info.name: info for info in library.loras.describe(exported(CPU_DTYPE))}
    assert served.keys() == installed.keys() >= {"ink_a", "ink_b"}
    ink_b = served["ink_b"]
    assert (ink_b["rank"], ink_b["networks"], ink_b["targets"]) == (2, {"unet": installed["ink_b"].networks["unet"]}, ["attention"])
    assert ink_b["sha256"] == installed["ink_b"].sha256 and "source" not in ink_b  # no path of the machine that added it
    key_file = tmp_path / "admin-key"  # the CLI's --admin-key-file, as an operator passes it
    key_file.write_text(triton.admin_key)
    result = subprocess.run([sys.executable, "-m", "client", "--info", "--url", triton.http_url, "--admin-key-file",
                             str(key_file)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("ink_")}
    assert rows.keys() == {"ink_a", "ink_b"}
    assert rows["ink_b"].split()[1:3] == ["2", "attention"] and rows["ink_b"].endswith(f"{ink_b['size_bytes'] / 1e6:.1f} MB")
    assert "text_encoder" in rows["ink_a"]
