"""img2img and inpainting on the real tritonserver (CPU variant, tiny model): mixed text-to-image,
img2img and inpainting traffic shares the engine's UNet executions and each request gets its own
image; the streaming endpoint with an image (a response per step that runs, the ensemble's final
images); bad image inputs refused over HTTP and gRPC naming the input, the server unaffected; the
client's --image/--strength/--mask. (Parity with diffusers for every scheduler: test_recipes.py.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import metric
from reference import sample_image, sample_mask

from client import ClientError, generate
from client.__main__ import main as client_main


IMAGE, MASK = sample_image(128, 192), sample_mask(128, 192)


def ask(server, protocol="grpc", **options):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return generate(options.pop("prompt", "a cat on a sofa"), url=url, protocol=protocol, **options)


def test_mixed_traffic_shares_the_engines_unet_calls_and_each_gets_its_own_image(engine_server, triton):
    """Text-to-image, img2img and inpainting requests sent together: each image equals the one its
    request gets alone, and from the loop design (ensemble_sdxl without the engine); the UNet rows
    the engine ran are exactly the steps each request runs (an init image's request skips the
    first ones), in fewer calls than requests x steps (they shared executions)."""
    kinds = [dict(height=128, width=192), dict(image=IMAGE, strength=0.5), dict(image=IMAGE, mask=MASK, strength=0.75)]
    specs = [dict(prompt=f"a cat {i}", seed=60 + i, num_inference_steps=4, guidance_scale=2.0 if i % 2 else 1.0,
                  num_images_per_prompt=1 + i % 2, **kinds[i % 3]) for i in range(6)]
    alone = [ask(engine_server, **dict(spec)).images for spec in specs]
    before = (metric(engine_server, "sdxl_engine_batch_rows_sum"), metric(engine_server, "sdxl_engine_batch_rows_count"))
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda spec: ask(engine_server, **dict(spec)).images, specs))
    for spec, single, concurrent in zip(specs, alone, together):
        assert concurrent.shape == (spec["num_images_per_prompt"], 128, 192, 3)
        assert np.abs(single.astype(int) - concurrent.astype(int)).max() <= 1
        assert np.abs(ask(triton, **dict(spec)).images.astype(int) - concurrent.astype(int)).max() <= 1
    rows = metric(engine_server, "sdxl_engine_batch_rows_sum") - before[0]
    calls = metric(engine_server, "sdxl_engine_batch_rows_count") - before[1]
    runs = {None: 4, 0.5: 2, 0.75: 3}  # UNet steps of each kind: int(4 * strength)
    expected = sum(s["num_images_per_prompt"] * (2 if s["guidance_scale"] > 1 else 1) * runs[s.get("strength")] for s in specs)
    print(f"engine: {rows:.0f} UNet rows in {calls:.0f} calls ({rows / calls:.2f} per call)")
    assert rows == expected
    assert calls < sum(runs[s.get("strength")] for s in specs)


def test_stream_with_an_image_answers_the_steps_that_run(triton):
    """4 steps at strength 0.5: the last two run; a response after each (numbered where they are in
    the schedule), the final images those of ensemble_sdxl."""
    case = dict(seed=3, num_inference_steps=4, strength=0.5, image=IMAGE, mask=MASK)
    updates = list(generate("a cat on a sofa", url=triton.grpc_url, protocol="grpc", stream=True, preview_every=1, **case))
    assert [(u.step, u.num_inference_steps, u.final) for u in updates] == [(3, 4, False), (4, 4, True)]
    assert updates[0].images.shape == updates[1].images.shape == (1, 128, 192, 3)
    plain = generate("a cat on a sofa", url=triton.grpc_url, protocol="grpc", **case)
    assert np.abs(updates[-1].images.astype(int) - plain.images.astype(int)).max() <= 1


BAD = {  # what is sent -> (the message's start, over both protocols)
    "4 channels": (dict(image=np.zeros((128, 128, 4), np.uint8)), "image"),
    "float pixels": (dict(image=np.zeros((128, 128, 3), np.float32)), "image"),
    "size not a multiple of 64": (dict(image=np.zeros((128, 100, 3), np.uint8)), "image: '<128x100 pixels>' is not accepted"),
    "height disagrees": (dict(image=IMAGE, height=256), "height: 256 is not accepted; expected 128 (the image's height)"),
    "strength NaN": (dict(image=IMAGE, strength=float("nan")), "strength: nan is not accepted; expected a number in (0, 1]"),
    "strength 0": (dict(image=IMAGE, strength=0.0), "strength: 0.0 is not accepted"),
    "mask without image": (dict(mask=MASK), "mask: '<uint8 [128, 192]>' is not accepted; expected a mask only with an image"),
    "mask of another size": (dict(image=IMAGE, mask=np.zeros((64, 64), np.uint8)), "mask: '<uint8 [64, 64]>' is not accepted"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", BAD)
def test_bad_image_inputs_are_refused_naming_the_input(triton, protocol, case):
    """INVALID_ARG naming the input: the endpoint's own message, or Triton's (a wrong dtype or a
    fourth channel is refused by the ensemble's declared type and dims before any model runs)."""
    sent, message = BAD[case]
    with pytest.raises(ClientError) as refused:
        ask(triton, protocol, seed=1, **sent)
    assert refused.value.status in ("400", "StatusCode.INVALID_ARGUMENT"), (refused.value.status, str(refused.value))
    assert message in str(refused.value), str(refused.value)
    assert ask(triton, protocol, seed=1, height=128, width=128).images.shape == (1, 128, 128, 3)  # the server goes on


def test_client_cli_image_strength_and_mask(triton, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(IMAGE).save(tmp_path / "in.png")
    Image.fromarray(MASK).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert client_main(["a cat on a sofa", "--url", triton.http_url, "--seed", "4", "--image", str(tmp_path / "in.png"),
                        "--strength", "0.75", "--mask", str(tmp_path / "mask.png"), "-o", str(out)]) == 0
    written = np.asarray(Image.open(out))
    expected = ask(triton, "http", seed=4, image=IMAGE, strength=0.75, mask=MASK).images[0]
    assert written.shape == (128, 192, 3) and np.array_equal(written, expected)
    assert client_main(["a cat", "--url", triton.http_url, "--image", str(tmp_path / "missing.png")]) == 1
    assert "missing.png: cannot read the image" in capsys.readouterr().err
