"""IP-Adapter image prompts on the real tritonserver (CPU variant, the tiny model with its plain IP-Adapter, as
make demo serves it; the Plus adapter on a second repository): each case against diffusers' load_ip_adapter +
set_ip_adapter_scale on the same weights, over both protocols and the stream; scale 0 and requests without an
image prompt answer as before, running the graphs they ran before; image-prompt and plain requests batched
together by the engine; bad inputs refused by name over both protocols and both endpoints; the client's --ip-image."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import metric
from reference import diffusers_ip_adapter_images, sample_image

from client import ClientError, Control, generate
from client.__main__ import main as client_main
from contract import layout
from contract.configs import CPU_DTYPE
from contract.networks import IMAGE_ENCODER, UNET_CONTROL_NAME, UNET_IP_NAME, UNET_NAME
from export.ip_adapter import IP_ADAPTER_SUBFOLDER, PLAIN_FILE, PLUS_FILE

# Served (ONNX Runtime, fp32) against diffusers (PyTorch, fp32): the serving tests' bounds (test_recipes.py).
PIXEL_MAX, PIXEL_MEAN = 1, 0.01
PROMPT = "a house by a lake"
REFERENCE_PHOTO = sample_image(300, 200, seed=12)  # any size: the server's CLIP processor resizes and crops it
REFERENCES: dict[str, np.ndarray] = {}  # diffusers' images of a case both protocols send
# InstantStyle's "style" (contract/ip_adapters.py: up_blocks.0.attentions.1) in diffusers' per-block form for the
# tiny UNet, whose first up block has two attentions (SDXL's three: [0.0, 1.0, 0.0]).
TINY_STYLE = {"up": {"block_0": [0.0, 1.0]}}


def assert_close(served: np.ndarray, expected: np.ndarray) -> None:
    assert served.shape == expected.shape
    difference = np.abs(served.astype(int) - expected.astype(int))
    assert difference.max() <= PIXEL_MAX and difference.mean() <= PIXEL_MEAN, (difference.max(), difference.mean())


def ask(server, protocol="grpc", **options):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return generate(PROMPT, url=url, protocol=protocol, **{"height": 128, "width": 128, **options})


@pytest.fixture(scope="module")
def pipe(loaded, exported):
    exported(CPU_DTYPE)  # gives the pipeline its IP-Adapter and image encoder (conftest.exported)
    return loaded(CPU_DTYPE).pipe


@pytest.fixture(scope="module")
def adapter_file(tiny_dir):
    return tiny_dir / IP_ADAPTER_SUBFOLDER / PLAIN_FILE


def executions(server, model: str) -> int:
    from test_controlnet_served import executions as counted

    return counted(server, model)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_image_prompt_with_cfg_and_two_images_matches_diffusers(triton, pipe, adapter_file, protocol):
    """Scale 1 (diffusers' default), CFG with a negative prompt (the negative rows take diffusers' negative
    image embeddings: zeros, projected), 2 images, non-square output, an image prompt of another size."""
    case = dict(seed=11, num_inference_steps=3, guidance_scale=2.0, negative_prompt="blurry", num_images_per_prompt=2,
                height=128, width=192)
    result = ask(triton, protocol, ip_adapter_image=REFERENCE_PHOTO, **case)
    if "cfg" not in REFERENCES:  # one diffusers run for both protocols
        REFERENCES["cfg"] = diffusers_ip_adapter_images(pipe, adapter_file, PROMPT, ip_image=REFERENCE_PHOTO, seed=11, steps=3,
                                                        guidance=2.0, negative="blurry", num_images=2, width=192)
    assert_close(result.images, REFERENCES["cfg"])
    plain = ask(triton, protocol, **case)
    assert np.abs(plain.images.astype(int) - result.images.astype(int)).max() > 10  # the image prompt changed the image


@pytest.mark.parametrize("scale, layers, diffusers_scale", [(0.6, None, 0.6), (0.6, "style", {"up": {"block_0": [0.0, 0.6]}})])
def test_scale_and_layer_settings_match_set_ip_adapter_scale(triton, pipe, adapter_file, scale, layers, diffusers_scale):
    """ip_adapter_scale 0.6 on every layer, and InstantStyle's style setting at 0.6: diffusers' set_ip_adapter_scale."""
    result = ask(triton, seed=13, num_inference_steps=2, height=128, width=128, ip_adapter_image=REFERENCE_PHOTO,
                 ip_adapter_scale=scale, ip_adapter_layers=layers)
    expected = diffusers_ip_adapter_images(pipe, adapter_file, PROMPT, ip_image=REFERENCE_PHOTO, seed=13, steps=2,
                                           scale=diffusers_scale)
    assert_close(result.images, expected)
    if layers:  # the setting keeps one layer of eleven: an image between the plain one and scale 0.6 everywhere
        everywhere = ask(triton, seed=13, num_inference_steps=2, ip_adapter_image=REFERENCE_PHOTO, ip_adapter_scale=scale)
        assert not np.array_equal(everywhere.images, result.images)


def test_scale_zero_and_plain_requests_run_the_graphs_they_ran_before(triton):
    """Scale 0 is the request without an image prompt, pixel for pixel, and neither calls the image encoder
    or unet_ip: the plain UNet runs. The encoder runs once per request, and not at all for an image it has
    encoded (the response cache)."""
    case = dict(seed=17, num_inference_steps=2)
    before = {model: executions(triton, model) for model in (IMAGE_ENCODER.name, UNET_IP_NAME, UNET_NAME)}
    zero = ask(triton, ip_adapter_image=REFERENCE_PHOTO, ip_adapter_scale=0.0, **case)
    plain = ask(triton, **case)
    after = {model: executions(triton, model) for model in before}
    assert np.array_equal(zero.images, plain.images)
    assert after[IMAGE_ENCODER.name] == before[IMAGE_ENCODER.name] and after[UNET_IP_NAME] == before[UNET_IP_NAME]
    assert after[UNET_NAME] > before[UNET_NAME]
    fresh = sample_image(64, 96, seed=99)  # an image no other test sends: not in the encoder's response cache
    ask(triton, ip_adapter_image=fresh, **case)
    assert executions(triton, IMAGE_ENCODER.name) == after[IMAGE_ENCODER.name] + 1  # once per request, not per step
    assert executions(triton, UNET_IP_NAME) == after[UNET_IP_NAME] + 2
    hits = metric(triton, "nv_cache_num_hits_per_model")
    ask(triton, ip_adapter_image=fresh, **case)  # the same image again: the cache answers, the encoder does not run
    assert executions(triton, IMAGE_ENCODER.name) == after[IMAGE_ENCODER.name] + 1
    assert metric(triton, "nv_cache_num_hits_per_model") > hits


def test_an_image_prompt_with_a_lora_matches_diffusers(triton, loaded, exported, adapter_file, tmp_path_factory):
    """A per-request LoRA beside the image prompt (unet_ip takes both): diffusers' load_lora_weights +
    set_adapters, then load_ip_adapter, on the same base."""
    from export.sources import load_pipeline
    from export.tiny import write_style_lora
    from export import lora as library

    base = loaded(CPU_DTYPE).pipe
    lora = write_style_lora(base, tmp_path_factory.mktemp("ip_lora"), seed=31, scale=0.08)
    repository = exported(CPU_DTYPE)
    if "ip_ink" not in library.loras.installed(repository):
        library.add(repository, "ip_ink", str(lora), 64)
    result = ask(triton, seed=19, num_inference_steps=2, loras=[("ip_ink", 0.7)], ip_adapter_image=REFERENCE_PHOTO,
                 ip_adapter_scale=0.8)
    reference = load_pipeline(loaded(CPU_DTYPE).sources, CPU_DTYPE).pipe
    reference.load_lora_weights(str(lora), adapter_name="ip_ink")
    reference.set_adapters(["ip_ink"], adapter_weights=[0.7])
    expected = diffusers_ip_adapter_images(reference, adapter_file, PROMPT, ip_image=REFERENCE_PHOTO, seed=19, steps=2, scale=0.8,
                                           image_encoder=base.image_encoder)
    assert_close(result.images, expected)


def test_an_image_prompt_on_img2img_matches_diffusers(triton, pipe, adapter_file):
    """An init image and an image prompt: diffusers' StableDiffusionXLImg2ImgPipeline after load_ip_adapter."""
    image = sample_image(128, 192, seed=2)
    result = ask(triton, seed=37, num_inference_steps=4, image=image, strength=0.75, ip_adapter_image=REFERENCE_PHOTO,
                 ip_adapter_scale=0.8, height=None, width=None)
    expected = diffusers_ip_adapter_images(pipe, adapter_file, PROMPT, ip_image=REFERENCE_PHOTO, seed=37, steps=4, scale=0.8,
                                           image=image, strength=0.75)
    assert_close(result.images, expected)


def test_an_image_prompt_with_a_controlnet_runs_unet_ip(triton):
    """A ControlNet beside the image prompt: one unet_ip call per step carries both (unet_control is not called)."""
    controls = [Control("tiny", sample_image(128, 128, seed=5), scale=0.8)]
    before = executions(triton, UNET_IP_NAME), executions(triton, UNET_CONTROL_NAME)
    both = ask(triton, seed=23, num_inference_steps=2, controls=controls, ip_adapter_image=REFERENCE_PHOTO)
    assert (executions(triton, UNET_IP_NAME), executions(triton, UNET_CONTROL_NAME)) == (before[0] + 2, before[1])
    control_only = ask(triton, seed=23, num_inference_steps=2, controls=controls)
    image_only = ask(triton, seed=23, num_inference_steps=2, ip_adapter_image=REFERENCE_PHOTO)
    assert not np.array_equal(both.images, control_only.images) and not np.array_equal(both.images, image_only.images)


def test_the_stream_serves_image_prompts(triton):
    """sdxl_stream's final image equals the ensemble's for the same request."""
    case = dict(seed=29, num_inference_steps=2, ip_adapter_image=REFERENCE_PHOTO, ip_adapter_scale=0.7, ip_adapter_layers="style")
    updates = list(ask(triton, stream=True, **case))
    assert np.array_equal(updates[-1].images, ask(triton, **case).images)


def test_the_engine_batches_image_prompt_and_plain_requests(engine_server, triton):
    """In the continuous-batching engine, requests with and without image prompts (and with CFG) share UNet
    calls (unet_ip, zeros for the rows without); each image equals its request alone on the loop."""
    cases = [dict(seed=41, ip_adapter_image=REFERENCE_PHOTO), dict(seed=42),
             dict(seed=43, ip_adapter_image=REFERENCE_PHOTO[::-1].copy(), guidance_scale=2.0, ip_adapter_scale=0.5), dict(seed=44)]
    with ThreadPoolExecutor(len(cases)) as pool:
        batched = list(pool.map(lambda case: ask(engine_server, num_inference_steps=3, **case).images, cases))
    for case, images in zip(cases, batched):
        assert_close(images, ask(triton, num_inference_steps=3, **case).images)


BAD_INPUTS = [
    (dict(ip_adapter_image=np.zeros((0, 64, 3), np.uint8)), "ip_adapter_image"),
    (dict(ip_adapter_image=np.zeros((64, 64, 3), np.float32)), "ip_adapter_image"),
    (dict(ip_adapter_image=np.zeros((2000, 64, 3), np.uint8)), "ip_adapter_image"),
    (dict(ip_adapter_image=REFERENCE_PHOTO, ip_adapter_scale=float("nan")), "ip_adapter_scale"),
    (dict(ip_adapter_image=REFERENCE_PHOTO, ip_adapter_scale=2.5), "ip_adapter_scale"),
    (dict(ip_adapter_image=REFERENCE_PHOTO, ip_adapter_scale=-0.1), "ip_adapter_scale"),
    (dict(ip_adapter_image=REFERENCE_PHOTO, ip_adapter_layers="everything"), "ip_adapter_layers"),
    (dict(ip_adapter_image=REFERENCE_PHOTO, ip_adapter_layers="layout"), "ip_adapter_layers"),  # not in the tiny UNet
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("options, name", BAD_INPUTS, ids=[f"{name}-{i}" for i, (_, name) in enumerate(BAD_INPUTS)])
def test_bad_image_prompt_inputs_are_refused_by_name(triton, protocol, options, name):
    with pytest.raises(ClientError, match=name):
        ask(triton, protocol, seed=1, num_inference_steps=1, **options)


@pytest.mark.parametrize("options, name", BAD_INPUTS[:1] + BAD_INPUTS[3:4] + BAD_INPUTS[6:7])
def test_the_stream_refuses_bad_image_prompts_by_name(triton, options, name):
    with pytest.raises(ClientError, match=name):
        list(ask(triton, stream=True, seed=1, num_inference_steps=1, **options))


def test_a_scale_without_an_image_is_refused(triton):
    """The raw input (the client library refuses it before sending)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    inputs = [grpcclient.InferInput("prompt", [1], "BYTES"), grpcclient.InferInput("ip_adapter_scale", [1], "FP32")]
    inputs[0].set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([0.5], np.float32))
    with pytest.raises(Exception, match="ip_adapter_scale"):
        client.infer("ensemble_sdxl", inputs)
    client.close()


def test_the_client_sends_an_image_prompt(triton, tmp_path):
    from PIL import Image

    photo = tmp_path / "reference.png"
    Image.fromarray(REFERENCE_PHOTO).save(photo)
    out = tmp_path / "out.png"
    assert client_main(["a house by a lake", "--url", triton.grpc_url, "--protocol", "grpc", "--seed", "7", "--steps", "1",
                        "--height", "128", "--width", "128", "--ip-image", str(photo), "--ip-scale", "0.6",
                        "--ip-layers", "style", "-o", str(out)]) == 0
    expected = ask(triton, seed=7, num_inference_steps=1, height=128, width=128, ip_adapter_image=REFERENCE_PHOTO,
                   ip_adapter_scale=0.6, ip_adapter_layers="style").images[0]
    assert np.array_equal(np.asarray(Image.open(out)), expected)


# The Plus adapter: a second repository, the CPU dtype's with its image encoder and unet_ip exported anew.
PLUS_MODELS = ["--model-control-mode=explicit", *(f"--load-model={model}" for model in (
    "ensemble_sdxl", "sdxl_stream", "denoiser", "unet", "loras", IMAGE_ENCODER.name, UNET_IP_NAME))]


@pytest.fixture(scope="module")
def plus_server(loaded, exported, tiny_dir, tmp_path_factory):
    """The repository of `exported(CPU_DTYPE)` with the Plus adapter's image_encoder and unet_ip in place of the
    plain one's, on its own server (the ensemble's and the stream's models alone). The other graphs take no image
    tokens; their export.json files record the dims of the export they now belong to (the Plus adapter's 16
    tokens), as a whole export with --ip-adapter ip-adapter-plus.safetensors writes them (a seconds-long stand-in
    for exporting every graph again)."""
    import torch

    from export.ip_adapter import IMAGE_ENCODER_SUBFOLDER, load_image_encoder, load_ip_adapter
    from export.onnx_export import export_pipeline
    from export.sources import LoadedPipeline
    from helpers import running
    from serving.server import TritonServer, free_ports

    base = loaded(CPU_DTYPE)
    repository = tmp_path_factory.mktemp("plus_repo")
    shutil.copytree(exported(CPU_DTYPE), repository, dirs_exist_ok=True)
    adapter = load_ip_adapter(str(tiny_dir / IP_ADAPTER_SUBFOLDER / PLUS_FILE), base.pipe.unet)
    encoder = load_image_encoder(str(tiny_dir / IMAGE_ENCODER_SUBFOLDER), adapter)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[CPU_DTYPE]
    stage = SimpleNamespace(**{**base.pipe.components, "ip_adapter": adapter.to(dtype), "image_encoder": encoder.to(dtype)})
    sources = replace(base.sources, ip_adapter=str(tiny_dir / IP_ADAPTER_SUBFOLDER / PLUS_FILE),
                      image_encoder=str(tiny_dir / IMAGE_ENCODER_SUBFOLDER))
    for info in repository.glob(f"*/1/{layout.EXPORT_INFO_FILE}"):
        recorded = json.loads(info.read_text())
        recorded["dims"]["ip_tokens"] = adapter.tokens
        info.write_text(json.dumps(recorded))
    export_pipeline(LoadedPipeline(stage, sources, base.adapters), repository, CPU_DTYPE, names=(UNET_IP_NAME, IMAGE_ENCODER.name))
    server = TritonServer(repository, "cpu", *free_ports(3), log_file=tmp_path_factory.mktemp("plus") / "tritonserver.log",
                          extra_args=PLUS_MODELS)
    with running(server):
        yield SimpleNamespace(server=server, encoder=encoder, file=tiny_dir / IP_ADAPTER_SUBFOLDER / PLUS_FILE)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_plus_adapter_matches_diffusers(plus_server, pipe, protocol):
    """Plus (16 tokens from a Resampler over the encoder's penultimate hidden states; CFG's negative tokens from
    the encoding of a zero image) with CFG and 2 images at scale 0.6: diffusers'."""
    case = dict(seed=51, num_inference_steps=2, guidance_scale=2.0, num_images_per_prompt=2, ip_adapter_scale=0.6)
    result = ask(plus_server.server, protocol, ip_adapter_image=REFERENCE_PHOTO, **case)
    if "plus" not in REFERENCES:
        REFERENCES["plus"] = diffusers_ip_adapter_images(pipe, plus_server.file, PROMPT, ip_image=REFERENCE_PHOTO, seed=51, steps=2,
                                                         guidance=2.0, num_images=2, scale=0.6, image_encoder=plus_server.encoder)
    assert_close(result.images, REFERENCES["plus"])


def test_the_plus_adapters_stream_and_style_setting(plus_server, pipe):
    """The stream's final image with InstantStyle's style setting: diffusers' with the per-block scale."""
    case = dict(seed=53, num_inference_steps=2, ip_adapter_image=REFERENCE_PHOTO, ip_adapter_layers="style")
    final = list(ask(plus_server.server, stream=True, **case))[-1].images
    expected = diffusers_ip_adapter_images(pipe, plus_server.file, PROMPT, ip_image=REFERENCE_PHOTO, seed=53, steps=2,
                                           scale={"up": {"block_0": [0.0, 1.0]}}, image_encoder=plus_server.encoder)
    assert_close(final, expected)
