"""ControlNets on the real tritonserver (CPU variant, the tiny model and its ControlNet, served as make
demo serves them): one ControlNet, two stacked with guidance windows, a ControlNet on an img2img request
and on the stream, each against diffusers' ControlNet pipelines; scale 0 and requests without ControlNets
answer as before, running the graphs they ran before; ControlNet and plain requests batched together by
the engine; every bad input refused by name over both protocols and both endpoints; the client's
--control and --info."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from reference import diffusers_controlnet_images, diffusers_union_images, example_depth_map, sample_image, sample_mask

from client import ClientError, Control, generate
from client.__main__ import main as client_main
from contract.configs import CPU_DTYPE
from contract.networks import UNET_CONTROL_NAME, controlnet_model

NAME, CANNY = "tiny", "canny"  # conftest.TINY_CONTROLNET, CANNY_CONTROLNET (the same weights; canny declares its preprocessor)
CONTROLNET = controlnet_model(NAME)
# conftest.UNION_CONTROLNET: the tiny ControlNet-Union, its modes (contract/controlnets.py UNION_MODES) union/depth (1) ...
DEPTH, UNION_CANNY, UNION = "union/depth", "union/canny", controlnet_model("union", union=True)
SERVED = "canny, tiny, union/{openpose,depth,hed,pidi,scribble,softedge,ted,canny,lineart,anime_lineart,mlsd,normal,segment}"
# Served (ONNX Runtime, fp32) against diffusers (PyTorch, fp32): the serving tests' bounds (test_recipes.py).
PIXEL_MAX, PIXEL_MEAN = 1, 0.01
EDGES, SKETCH = sample_image(128, 192, seed=5), sample_image(128, 192, seed=9)[::-1].copy()
REFERENCES: dict[str, np.ndarray] = {}  # diffusers' images of a case both protocols send


def assert_close(served: np.ndarray, expected: np.ndarray) -> None:
    assert served.shape == expected.shape
    difference = np.abs(served.astype(int) - expected.astype(int))
    assert difference.max() <= PIXEL_MAX and difference.mean() <= PIXEL_MEAN, (difference.max(), difference.mean())


def ask(server, protocol="grpc", prompt="a house by a lake", **options):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return generate(prompt, url=url, protocol=protocol, **options)


def executions(server, model: str) -> int:
    """How many times Triton ran `model` (its statistics: an admin API, with the server's key)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(model, headers=server.admin_headers("grpc"), as_json=True)
    finally:
        client.close()
    return sum(int(entry.get("execution_count", 0)) for entry in stats.get("model_stats", []))


@pytest.fixture(scope="module")
def pipe(loaded, exported):
    exported(CPU_DTYPE)  # gives the pipeline its ControlNet (conftest.exported)
    return loaded(CPU_DTYPE).pipe


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_one_controlnet_matches_diffusers(triton, pipe, protocol):
    """CFG with a negative prompt, 2 images, non-square, scale 0.8: diffusers' StableDiffusionXLControlNetPipeline."""
    result = ask(triton, protocol, seed=11, num_inference_steps=3, guidance_scale=2.0, negative_prompt="blurry",
                 num_images_per_prompt=2, controls=[Control(NAME, EDGES, scale=0.8)])
    if "one" not in REFERENCES:  # one diffusers run for both protocols
        REFERENCES["one"] = diffusers_controlnet_images(pipe, [pipe.controlnet], "a house by a lake", control_images=[EDGES], seed=11,
                                                        steps=3, scales=[0.8], guidance=2.0, negative="blurry", num_images=2)
    assert_close(result.images, REFERENCES["one"])
    plain = ask(triton, protocol, seed=11, num_inference_steps=3, guidance_scale=2.0, negative_prompt="blurry",
                num_images_per_prompt=2, height=128, width=192)
    assert np.abs(plain.images.astype(int) - result.images.astype(int)).max() > 10  # the ControlNet changed the image


def test_two_stacked_with_guidance_windows_match_diffusers(engine_server, pipe):
    """Two ControlNet models, each with its own image, scale and window (the first half, the second half
    of the schedule), in the engine: diffusers' MultiControlNetModel with the same lists."""
    controls = [Control(NAME, EDGES, scale=0.6, start=0.0, end=0.5), Control(CANNY, SKETCH, scale=1.3, start=0.5, end=1.0)]
    result = ask(engine_server, seed=21, num_inference_steps=4, controls=controls)
    expected = diffusers_controlnet_images(pipe, [pipe.controlnet] * 2, "a house by a lake", control_images=[EDGES, SKETCH],
                                           seed=21, steps=4, scales=[0.6, 1.3], starts=[0.0, 0.5], ends=[0.5, 1.0])
    assert_close(result.images, expected)


def test_the_canny_preprocessor_makes_the_map_diffusers_examples_make(triton, pipe):
    """control_preprocess on `canny`: the control map is cv2.Canny(image, 100, 200) on three channels, as in
    the SDXL canny ControlNet's diffusers example; the image equals the request that sends that map, and
    diffusers' with it; so for a union model's canny mode. The same ControlNet without a preprocessor refuses it."""
    import cv2

    photo = sample_image(128, 192, seed=3)
    edges = cv2.Canny(photo, 100, 200)[:, :, None].repeat(3, axis=2)
    preprocessed = ask(triton, seed=71, num_inference_steps=2, controls=[Control(CANNY, photo, preprocess=True)]).images
    sent = ask(triton, seed=71, num_inference_steps=2, controls=[Control(CANNY, edges)]).images
    assert np.array_equal(preprocessed, sent)
    expected = diffusers_controlnet_images(pipe, [pipe.controlnet], "a house by a lake", control_images=[edges], seed=71, steps=2)
    assert_close(preprocessed, expected)
    union = [ask(triton, seed=71, num_inference_steps=2, controls=[Control(UNION_CANNY, image, preprocess=image is photo)]).images
             for image in (photo, edges)]  # a union's canny mode: the same preprocessor
    assert np.array_equal(*union)


def test_the_depth_preprocessor_makes_the_map_diffusers_example_makes(triton, pipe):
    """control_preprocess on union/depth: the export's depth estimator (Depth Anything, its image processor)
    and diffusers' SDXL depth ControlNet example's normalization: the image equals the request that sends
    the map transformers' model makes that way in PyTorch."""
    photo = sample_image(128, 192, seed=4)
    reference = example_depth_map(pipe.depth_estimator, pipe.depth_processor, photo)
    assert reference.std() > 20  # a map with contrast, not a flat one
    preprocessed = ask(triton, seed=73, num_inference_steps=2, controls=[Control(DEPTH, photo, preprocess=True)]).images
    sent = ask(triton, seed=73, num_inference_steps=2, controls=[Control(DEPTH, reference)]).images
    assert_close(preprocessed, sent)


def test_a_controlnet_on_img2img_matches_diffusers(triton, pipe):
    """diffusers' StableDiffusionXLControlNetImg2ImgPipeline: its window counts the steps that run."""
    image = sample_image(128, 192, seed=1)
    result = ask(triton, "http", seed=31, num_inference_steps=4, image=image, strength=0.75,
                 controls=[Control(NAME, EDGES, scale=1.0, start=0.0, end=0.7)])
    expected = diffusers_controlnet_images(pipe, [pipe.controlnet], "a house by a lake", control_images=[EDGES], seed=31, steps=4,
                                           ends=[0.7], image=image, strength=0.75)
    assert_close(result.images, expected)


def test_a_controlnet_on_inpainting_matches_diffusers(engine_server, pipe):
    """diffusers' StableDiffusionXLControlNetInpaintPipeline (a 4-channel UNet: latent blending), in the engine."""
    image, mask = sample_image(128, 192, seed=2), sample_mask(128, 192)
    result = ask(engine_server, seed=35, num_inference_steps=4, image=image, mask=mask, strength=0.75, guidance_scale=2.0,
                 controls=[Control(CANNY, EDGES, scale=0.9)])
    expected = diffusers_controlnet_images(pipe, [pipe.controlnet], "a house by a lake", control_images=[EDGES], seed=35, steps=4,
                                           scales=[0.9], guidance=2.0, image=image, strength=0.75, mask=mask)
    assert_close(result.images, expected)


def test_a_controlnet_with_a_lora_matches_diffusers(triton, loaded, pipe, tmp_path):
    """A LoRA of the library (the UNet and both text encoders) and a ControlNet in one request: unet_control
    with the LoRA's weights; diffusers' ControlNet pipeline with the LoRA loaded (set_adapters)."""
    from export import lora as library
    from export.sources import load_pipeline
    from export.tiny import write_style_lora

    path = write_style_lora(pipe, tmp_path / "ink_a", seed=21, scale=0.08)  # test_lora_served.py's ink_a
    if "ink_a" not in library.loras.installed(triton.repository):
        library.add(triton.repository, "ink_a", str(path), 64)
    result = ask(triton, seed=45, num_inference_steps=3, loras=[("ink_a", 0.7)], controls=[Control(NAME, EDGES, scale=0.9)])
    styled = load_pipeline(loaded(CPU_DTYPE).sources, CPU_DTYPE).pipe
    styled.load_lora_weights(str(path), adapter_name="ink_a")
    styled.set_adapters(["ink_a"], adapter_weights=[0.7])
    expected = diffusers_controlnet_images(styled, [pipe.controlnet], "a house by a lake", control_images=[EDGES], seed=45, steps=3,
                                           scales=[0.9])
    assert_close(result.images, expected)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_union_models_two_modes_take_one_pass_as_diffusers(triton, pipe, protocol):
    """union/depth and union/canny in one request, CFG with a negative prompt, 2 images, the canny mode's
    window ending at 0.7: diffusers' StableDiffusionXLControlNetUnionPipeline with control_mode=[1, 3]
    (one pass a step, the scales inside the network). One pass: the union ran once per step."""
    before = executions(triton, UNION)
    result = ask(triton, protocol, seed=13, num_inference_steps=3, guidance_scale=2.0, negative_prompt="blurry",
                 num_images_per_prompt=2, controls=[Control(DEPTH, EDGES, scale=0.7), Control(UNION_CANNY, SKETCH, scale=1.2, end=0.7)])
    assert executions(triton, UNION) - before == 3
    if "two modes" not in REFERENCES:  # one diffusers run for both protocols
        REFERENCES["two modes"] = diffusers_union_images(
            pipe, pipe.union_controlnet, "a house by a lake", control_images=[EDGES, SKETCH], modes=[1, 3], seed=13, steps=3,
            scales=[0.7, 1.2], ends=[1.0, 0.7], guidance=2.0, negative="blurry", num_images=2)
    assert_close(result.images, REFERENCES["two modes"])


def test_a_union_models_lone_mode_with_a_window_matches_diffusers(triton, pipe):
    """One mode (diffusers scales its residuals after the network), from the second step on."""
    result = ask(triton, seed=17, num_inference_steps=4, controls=[Control(DEPTH, SKETCH, scale=0.8, start=0.25)])
    expected = diffusers_union_images(pipe, pipe.union_controlnet, "a house by a lake", control_images=[SKETCH], modes=[1],
                                      seed=17, steps=4, scales=[0.8], starts=[0.25])
    assert_close(result.images, expected)
    plain = ask(triton, seed=17, num_inference_steps=4, height=128, width=192).images
    assert np.abs(plain.astype(int) - result.images.astype(int)).max() > 10  # the union changed the image


def test_scale_zero_and_no_controlnet_run_the_graphs_they_ran_before(triton):
    """A request without ControlNets, or whose ControlNets have scale 0 or no step in their window, runs
    unet alone: controlnet_tiny and unet_control are not called, and the image is the plain one."""
    graphs = (CONTROLNET, UNION, UNET_CONTROL_NAME)
    before = [executions(triton, graph) for graph in graphs], executions(triton, "unet")
    plain = ask(triton, seed=41, num_inference_steps=2, height=128, width=192).images
    zero = ask(triton, seed=41, num_inference_steps=2, controls=[Control(NAME, EDGES, scale=0.0)]).images
    outside = ask(triton, seed=41, num_inference_steps=2, controls=[Control(NAME, EDGES, start=0.0, end=0.4)]).images
    union = ask(triton, seed=41, num_inference_steps=2, controls=[Control(DEPTH, EDGES, scale=0.0),
                                                                  Control(UNION_CANNY, SKETCH, start=0.0, end=0.4)]).images
    assert np.array_equal(zero, plain) and np.array_equal(outside, plain)  # 2 steps: step 0 ends at 0.5 > 0.4
    assert np.array_equal(union, plain)  # the union's modes all at 0 or outside: no pass (docs/controlnet.md)
    assert [executions(triton, graph) for graph in graphs] == before[0]
    assert executions(triton, "unet") >= before[1] + 8


def test_the_stream_with_a_controlnet_ends_with_the_ensembles_image(triton):
    case = dict(seed=51, num_inference_steps=3, controls=[Control(NAME, EDGES, scale=1.1, end=0.8), Control(DEPTH, SKETCH, 0.6)])
    updates = list(generate("a house by a lake", url=triton.grpc_url, protocol="grpc", stream=True, preview_every=1, **case))
    assert [(u.step, u.final) for u in updates] == [(1, False), (2, False), (3, True)]
    plain = ask(triton, **case)
    assert np.abs(updates[-1].images.astype(int) - plain.images.astype(int)).max() <= 1


def test_the_engine_batches_controlnet_and_plain_requests_and_each_gets_its_own_image(engine_server):
    """Requests with and without ControlNets sent together: each image equals its request's alone; the
    ControlNet ran fewer times than the controlled requests' steps (their rows shared calls)."""
    specs = [dict(prompt=f"a house {i}", seed=60 + i, num_inference_steps=3, guidance_scale=2.0 if i % 2 else 1.0,
                  **({"controls": [Control(NAME, EDGES if i % 4 else SKETCH, scale=0.5 + 0.25 * i)]} if i % 3 else
                     {"height": 128, "width": 192})) for i in range(6)]
    # Union requests of one and of two modes (their calls pad the slots), beside a ControlNet
    specs += [dict(prompt="a house 6", seed=66, num_inference_steps=3, controls=[Control(DEPTH, SKETCH, 0.9)]),
              dict(prompt="a house 7", seed=67, num_inference_steps=3, guidance_scale=2.0,
                   controls=[Control(UNION_CANNY, EDGES, 1.1), Control(NAME, SKETCH, 0.5), Control(DEPTH, SKETCH, 0.6)])]
    alone = [ask(engine_server, **dict(spec)).images for spec in specs]
    before = executions(engine_server, CONTROLNET)
    with ThreadPoolExecutor(len(specs)) as pool:
        together = list(pool.map(lambda spec: ask(engine_server, **dict(spec)).images, specs))
    for single, concurrent in zip(alone, together):
        assert np.abs(single.astype(int) - concurrent.astype(int)).max() <= 1
    controlled_steps = sum(spec["num_inference_steps"] for spec in specs if "controls" in spec)
    assert executions(engine_server, CONTROLNET) - before < controlled_steps


def control(**overrides) -> dict:
    """control_* inputs of one valid ControlNet (128 x 192), with `overrides` (None: not sent)."""
    arrays = {"control_names": np.array([NAME.encode()], dtype=object), "control_images": EDGES[None],
              "control_scales": np.array([1.0], np.float32), "control_guidance_start": np.array([0.0], np.float32),
              "control_guidance_end": np.array([1.0], np.float32), "control_preprocess": np.array([False])}
    arrays.update(overrides)
    return {name: value for name, value in arrays.items() if value is not None}


BAD = {  # what is sent -> the start of the message
    "unknown name": (control(control_names=np.array([b"depth"], dtype=object)),
                     f"control_names: 'depth' is not accepted; expected a ControlNet served here: {SERVED}"),
    "unknown union mode": (control(control_names=np.array([b"union/pose"], dtype=object)),
                           "control_names: 'union/pose' is not accepted; expected a ControlNet served here: canny, tiny, union/{"),
    "more than max_controlnets": (control(control_names=np.array([NAME.encode()] * 4, dtype=object),
                                          control_images=np.stack([EDGES] * 4)),
                                  "control_names: '<4 values, shape [4]>' is not accepted; expected 1 to 3 names"),
    "no image": (control(control_images=None), "control_images: missing; expected UINT8 [1, 128, 192, 3]"),
    "images fewer than names": (control(control_names=np.array([NAME.encode()] * 2, dtype=object)),
                                "control_images: '<uint8 [1, 128, 192, 3]>' is not accepted; expected UINT8 [2, 128, 192, 3]"),
    "image of another size": (control(control_images=np.zeros((1, 128, 128, 3), np.uint8)),
                              "control_images: '<uint8 [1, 128, 128, 3]>' is not accepted; expected UINT8 [1, 128, 192, 3]"),
    "scale above 2": (control(control_scales=np.array([2.5], np.float32)), "control_scales: 2.5 is not accepted; expected a number from 0 to 2"),
    "scale NaN": (control(control_scales=np.array([np.nan], np.float32)), "control_scales: nan is not accepted"),
    "scales fewer than names": (control(control_scales=np.array([], np.float32)),
                                "control_scales: '<0 values, shape [0]>' is not accepted; expected one value per control name ([1])"),
    "start not below end": (control(control_guidance_start=np.array([0.6], np.float32), control_guidance_end=np.array([0.6], np.float32)),
                            "control_guidance_start: '0.6 with control_guidance_end 0.6 for tiny' is not accepted; expected start < end"),
    "end above 1": (control(control_guidance_end=np.array([1.5], np.float32)), "control_guidance_end: 1.5 is not accepted; expected a number in (0, 1]"),
    "start below 0": (control(control_guidance_start=np.array([-0.1], np.float32)), "control_guidance_start: -0.1 is not accepted"),
    "preprocess without a preprocessor": (control(control_preprocess=np.array([True])),
                                          "control_preprocess: 'true for tiny' is not accepted; expected false for tiny"),
    "preprocess of a union mode without one": (control(control_names=np.array([b"union/openpose"], dtype=object),
                                                       control_preprocess=np.array([True])),
                                               "control_preprocess: 'true for union/openpose' is not accepted; expected false for union/openpose"),
    "inputs without names": (control(control_names=None), "control_images: '<uint8 [1, 128, 192, 3]>' is not accepted; expected no "
                             "ControlNet inputs without control_names"),
}


def send(server, protocol: str, model: str, arrays: dict):
    """One raw request (prompt, 128 x 192, seed) with `arrays`; the server's error message, or None."""
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    import tritonclient.http as httpclient

    module = grpcclient if protocol == "grpc" else httpclient
    url = server.grpc_url if protocol == "grpc" else server.http_url
    arrays = {"prompt": np.array([b"a house"], dtype=object), "height": np.array([128], np.int32),
              "width": np.array([192], np.int32), "seed": np.array([1], np.int64), **arrays}
    inputs = []
    for name, value in arrays.items():
        inputs.append(module.InferInput(name, list(value.shape), "BYTES" if value.dtype == object else np_to_triton_dtype(value.dtype)))
        inputs[-1].set_data_from_numpy(value)
    client = module.InferenceServerClient(url)
    errors = []
    try:
        if model == "ensemble_sdxl":
            client.infer(model, inputs)
            return None
        client.start_stream(callback=lambda result, error: errors.append(error))
        client.async_stream_infer(model, inputs)
        client.stop_stream()
        return next((str(e) for e in errors if e is not None), None)
    except InferenceServerException as error:
        return str(error)
    finally:
        client.close()


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("protocol, model", [("http", "ensemble_sdxl"), ("grpc", "ensemble_sdxl"), ("grpc", "sdxl_stream")])
def test_bad_controlnet_inputs_are_refused_by_name(triton, protocol, model, case):
    arrays, message = BAD[case]
    error = send(triton, protocol, model, arrays)
    assert error is not None and message in error, error
    if case == "unknown name" and model == "sdxl_stream":  # the server is unaffected
        assert ask(triton, seed=1, num_inference_steps=1, height=128, width=128).images.shape == (1, 128, 128, 3)


def test_client_control_and_info(triton, tmp_path, capsys, monkeypatch):
    from PIL import Image

    edges = tmp_path / "edges.png"
    Image.fromarray(EDGES).save(edges)
    out = tmp_path / "out.png"
    assert client_main(["a house by a lake", "--url", triton.http_url, "--seed", "11", "--steps", "2", "-o", str(out),
                        "--control", f"{NAME}={edges}:0.8:0:0.9"]) == 0
    written = np.asarray(Image.open(out))
    expected = ask(triton, "http", seed=11, num_inference_steps=2, controls=[Control(NAME, EDGES, 0.8, 0.0, 0.9)]).images[0]
    assert np.array_equal(written, expected)
    assert client_main(["a house", "--url", triton.http_url, "--control", f"{NAME}={edges}", "--control-preprocess"]) == 1
    assert "control_preprocess: 'true for tiny' is not accepted" in capsys.readouterr().err
    monkeypatch.setenv("SDXL_ADMIN_KEY", triton.admin_key)
    assert client_main(["--info", "--url", triton.grpc_url, "--protocol", "grpc"]) == 0
    assert "controlnets       canny, tiny, union/MODE" in capsys.readouterr().out
    with pytest.raises(ClientError, match="control_names: 'nope' is not accepted"):
        ask(triton, controls=[Control("nope", EDGES)])
