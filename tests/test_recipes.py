"""The few-step family: each scheduler of the recipes exported with the tiny pipeline and served by a
real tritonserver, against diffusers' StableDiffusionXLPipeline with that scheduler; the tiny
SSD-1B layout with its LCM-LoRA through `--preset ssd-1b-lcm`; a distilled UNet given with --unet is
the one served; presets resolve to their hub ids without network; the recipe's step range and
defaults on the endpoint; `python -m client --info`."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from helpers import ENSEMBLE_ONLY, running
from reference import diffusers_from_image, diffusers_images, sample_image, sample_mask

from client import ClientError, generate, info
from client.__main__ import main as client_main
from contract import layout
from contract.configs import CPU_DTYPE, read_config, parameters
from contract.recipes import PRESETS, SCHEDULERS, Recipe, custom_recipe, resolve
from export.cli import main as export_main
from export.onnx_export import export_pipeline
from export.sources import ExportError, LoraSpec, Sources, hub_file, load_pipeline, load_unet
from export.tiny import build_tiny_pipeline
from serving.server import TritonServer, free_ports

# Served (ONNX Runtime, fp32) against diffusers (PyTorch, fp32): the serving tests' bounds.
PIXEL_MAX, PIXEL_MEAN = 1, 0.01
CASES = {
    "1 step, no CFG, 2 images": dict(prompt="a photo of a cat", seed=42, steps=1, guidance=0.0, negative="", num_images=2),
    "3 steps, CFG, 2 images": dict(prompt="a red rose", seed=9, steps=3, guidance=2.0, negative="blurry", num_images=2),
}


def assert_close(served: np.ndarray, expected: np.ndarray) -> None:
    assert served.shape == expected.shape
    difference = np.abs(served.astype(int) - expected.astype(int))
    assert difference.max() <= PIXEL_MAX and difference.mean() <= PIXEL_MEAN, (difference.max(), difference.mean())


def serve(repository, tmp_path_factory):
    """The repository on a started server, stopped quickly at the end (a `with` block). These tests call
    ensemble_sdxl only: explicit model control (helpers.ENSEMBLE_ONLY) loads it, its steps and what its scheduler calls (the
    unet, the vae_encoder for img2img) and the LoRA listing (the client's --info), not the streaming
    endpoint's models (a third of a start)."""
    log = tmp_path_factory.mktemp("recipe_server") / "tritonserver.log"
    # Two denoising loops (the CPU variant has 4): enough for the concurrent test, two fewer processes
    # importing torch at each start. The repository is each test's own copy.
    config = repository / "scheduler" / "configs" / "cpu.pbtxt"
    config.write_text(re.sub(r"count: \d+", "count: 2", config.read_text()))
    return running(TritonServer(repository, "cpu", *free_ports(3), log_file=log, extra_args=ENSEMBLE_ONLY))


def ask(server, case: dict, **extra):
    return generate(case["prompt"], url=server.grpc_url, protocol="grpc", seed=case["seed"], num_inference_steps=case["steps"],
                    guidance_scale=case["guidance"], negative_prompt=case["negative"] or None, height=128, width=128,
                    num_images_per_prompt=case["num_images"], **extra)


# --- each scheduler, served ----------------------------------------------------------------------

SERVED = {  # recipe kind -> (eta, step range and defaults of the custom recipe served)
    "euler-ancestral": None, "euler": None, "tcd": 0.3, "ddim": None, "lcm": None,
    "model": None,  # the tiny pipeline's own: SDXL base's EulerDiscreteScheduler, leading spacing (sdxl-base's)
}


@pytest.fixture(scope="module", params=list(SERVED))
def scheduler_server(request, exported, loaded, tmp_path_factory):
    """The tiny graphs (exported once) with each recipe's scheduler: export_pipeline writes only the
    serving files, the recipe and the configs (names=()), as a full export would."""
    kind = request.param
    repository = tmp_path_factory.mktemp(f"recipe_{kind}")
    shutil.copytree(exported(CPU_DTYPE), repository, dirs_exist_ok=True)
    sources = loaded(CPU_DTYPE).sources
    recipe = Recipe(f"tiny-{kind}", sources.model, kind, loras=tuple(str(lora) for lora in sources.loras), vae=sources.vae,
                    min_steps=1, max_steps=6, default_steps=2, default_guidance=0.0, eta=SERVED[kind], size=128)
    export_pipeline(loaded(CPU_DTYPE), repository, CPU_DTYPE, names=(), recipe=recipe)
    with serve(repository, tmp_path_factory) as server:
        yield kind, recipe, server


@pytest.mark.parametrize("case", CASES)
def test_each_scheduler_served_matches_diffusers(scheduler_server, loaded, case):
    kind, recipe, server = scheduler_server
    spec = CASES[case]
    result = ask(server, spec)
    expected = diffusers_images(loaded(CPU_DTYPE).pipe, spec["prompt"], seed=spec["seed"], steps=spec["steps"],
                                guidance=spec["guidance"], negative=spec["negative"], num_images=spec["num_images"],
                                scheduler=kind, eta=recipe.eta)
    assert_close(result.images, expected)
    assert result.seeds == [spec["seed"], spec["seed"] + 1]


IMAGE_CASES = {  # (protocol, steps, strength, guidance, images, height, width)
    "http, CFG, 2 images, non-square": ("http", 4, 0.5, 2.0, 2, 128, 192),
    "grpc, no CFG, 1 image": ("grpc", 3, 1.0, 0.0, 1, 192, 128),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpainting_served_match_diffusers(scheduler_server, loaded, kind, case):
    """The image's size is the output's (no height/width sent); the mask makes it inpainting."""
    scheduler, recipe, server = scheduler_server
    protocol, steps, strength, guidance, images, height, width = IMAGE_CASES[case]
    image = sample_image(height, width, seed=steps)
    mask = sample_mask(height, width) if kind == "inpaint" else None
    negative = "blurry" if guidance > 1 else ""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    result = generate("a cat on a sofa", url=url, protocol=protocol, seed=31, num_inference_steps=steps, guidance_scale=guidance,
                      negative_prompt=negative or None, num_images_per_prompt=images, image=image, strength=strength, mask=mask)
    expected = diffusers_from_image(loaded(CPU_DTYPE).pipe, "a cat on a sofa", image=image, mask=mask, seed=31, steps=steps,
                                    strength=strength, guidance=guidance, negative=negative, num_images=images,
                                    scheduler=scheduler, eta=recipe.eta)
    assert_close(result.images, expected)
    assert result.seeds == [31 + i for i in range(images)]


def test_concurrent_requests_batch_in_the_unet_and_each_equals_its_own_run(scheduler_server):
    """Concurrent requests of different step counts, CFG or not, 1 or 2 images: the UNet's dynamic
    batching merges their calls at whatever step each is (one timestep per sample); each image is
    still the one its request gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    kind, recipe, server = scheduler_server
    specs = [dict(prompt=f"a lighthouse {i}", seed=100 + i, steps=2 + i % 3, guidance=2.0 if i % 2 else 0.0,
                  negative="", num_images=1 + i % 2) for i in range(6)]
    alone = [ask(server, spec).images for spec in specs]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda spec: ask(server, spec).images, specs))
    for single, concurrent in zip(alone, together):
        assert np.abs(single.astype(int) - concurrent.astype(int)).max() <= 1


def test_recipe_defaults_and_step_range_on_the_endpoint(scheduler_server, loaded):
    kind, recipe, server = scheduler_server
    omitted = generate("a lighthouse", url=server.http_url, seed=3, height=128, width=128)  # no steps, no guidance
    expected = diffusers_images(loaded(CPU_DTYPE).pipe, "a lighthouse", seed=3, steps=recipe.default_steps,
                                guidance=recipe.default_guidance, scheduler=kind, eta=recipe.eta)
    assert_close(omitted.images, expected)
    with pytest.raises(ClientError, match=rf"num_inference_steps: 7 is not accepted; expected an integer from 1 to 6 "
                                          rf"\(recipe tiny-{kind}\)"):
        generate("a lighthouse", url=server.http_url, num_inference_steps=7, height=128, width=128)


def test_client_info_reports_the_recipe(scheduler_server, capsys, monkeypatch):
    kind, recipe, server = scheduler_server
    served = info(server.grpc_url, "grpc", admin_key=server.admin_key)
    assert served == {**info(server.http_url, "http", admin_key=server.admin_key)}
    scheduler_class = SCHEDULERS[kind].class_name or "EulerDiscreteScheduler"  # model: the tiny pipeline's own
    assert served["recipe"] == recipe.name and served["recipe_scheduler"] == scheduler_class
    assert served["default_steps"] == "2" and served["max_steps"] == "6" and served["recipe_model"] == recipe.model
    monkeypatch.setenv("SDXL_ADMIN_KEY", server.admin_key)  # the CLI's key from the environment
    assert client_main(["--info", "--url", server.http_url]) == 0
    out = capsys.readouterr().out
    assert f"recipe_scheduler  {scheduler_class}" in out and f"recipe            {recipe.name}" in out


# --- the standard recipe, sdxl-base ----------------------------------------------------------------

def test_sdxl_base_defaults_served_match_diffusers(exported, loaded, tmp_path_factory):
    """`sdxl-base` with the tiny sources in place of the hub's: a request that sends neither steps nor
    guidance runs 20 Euler (leading) steps with CFG 5.0, equal to diffusers' pipeline with the model's
    own scheduler, over HTTP and gRPC; the recipe's range 1 to 50 is the endpoint's."""
    from dataclasses import replace

    repository = tmp_path_factory.mktemp("recipe_sdxl_base")
    shutil.copytree(exported(CPU_DTYPE), repository, dirs_exist_ok=True)
    sources = loaded(CPU_DTYPE).sources
    recipe = replace(PRESETS["sdxl-base"], model=sources.model, vae=sources.vae, loras=tuple(str(lora) for lora in sources.loras))
    export_pipeline(loaded(CPU_DTYPE), repository, CPU_DTYPE, names=(), recipe=recipe)
    assert parameters(read_config(repository, "scheduler", "cpu"))["recipe_scheduler"] == "EulerDiscreteScheduler"
    expected = diffusers_images(loaded(CPU_DTYPE).pipe, "a lighthouse", seed=5, steps=20, guidance=5.0, negative="blurry",
                                num_images=2, height=128, width=192, scheduler="model")
    with serve(repository, tmp_path_factory) as server:
        for protocol in ("http", "grpc"):
            url = server.grpc_url if protocol == "grpc" else server.http_url
            result = generate("a lighthouse", url=url, protocol=protocol, seed=5, negative_prompt="blurry", height=128, width=192,
                              num_images_per_prompt=2)
            assert_close(result.images, expected)
        with pytest.raises(ClientError, match=r"num_inference_steps: 51 is not accepted; expected an integer from 1 to 50 "
                                              r"\(recipe sdxl-base\)"):
            generate("a lighthouse", url=server.http_url, num_inference_steps=51, height=128, width=128)


# --- SSD-1B's layout, through --preset ssd-1b-lcm ------------------------------------------------

def test_tiny_ssd_1b_exported_with_its_preset_and_served_matches_diffusers(tmp_path_factory):
    source = tmp_path_factory.mktemp("tiny_ssd_1b")
    assert export_main(["random", str(source), "--arch", "ssd-1b"]) == 0
    repository = tmp_path_factory.mktemp("repo_ssd_1b")
    # The preset's scheduler and step range; the flags beside it replace its hub ids by the tiny files.
    assert export_main(["onnx", "--preset", "ssd-1b-lcm", "--model", str(source), "--lora", str(source / "lora"),
                        "--vae", str(source / "alt_vae"), "--dtype", CPU_DTYPE, "--out", str(repository)]) == 0
    scheduler = parameters(read_config(repository, "scheduler", "cpu"))
    assert scheduler["recipe"] == "ssd-1b-lcm" and scheduler["recipe_scheduler"] == "LCMScheduler"
    assert scheduler["recipe_model"] == str(source)
    pipe = load_pipeline(Sources(str(source), (LoraSpec(str(source / "lora")),), str(source / "alt_vae")), CPU_DTYPE).pipe
    assert type(pipe.unet.mid_block).__name__ == "UNetMidBlock2D"  # SSD-1B: no attention in the mid block
    assert [len(a.transformer_blocks) for a in pipe.unet.up_blocks[0].attentions] == [4, 4, 10]
    with serve(repository, tmp_path_factory) as server:
        for case in CASES.values():
            spec = {**case, "guidance": 1.0 if case["guidance"] == 0.0 else case["guidance"]}
            result = ask(server, spec)
            expected = diffusers_images(pipe, spec["prompt"], seed=spec["seed"], steps=spec["steps"], guidance=spec["guidance"],
                                        negative=spec["negative"], num_images=spec["num_images"], scheduler="lcm")
            assert_close(result.images, expected)


# --- a distilled UNet in place of the model's ----------------------------------------------------

def test_unet_given_with_flag_is_the_one_served(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("unet_override")
    (root / "model").symlink_to(tiny_dir)  # the session's tiny model (seed 0), read only
    distilled = build_tiny_pipeline(seed=5).unet  # same architecture, other weights
    from safetensors.torch import save_file

    save_file(distilled.state_dict(), root / "distilled_unet.safetensors")
    repository = root / "repo"
    assert export_main(["onnx", "--model", str(root / "model"), "--unet", str(root / "distilled_unet.safetensors"),
                        "--scheduler", "euler", "--dtype", CPU_DTYPE, "--out", str(repository)]) == 0
    assert parameters(read_config(repository, "scheduler", "cpu"))["recipe_unet"] == str(root / "distilled_unet.safetensors")
    with_distilled = load_pipeline(Sources(str(root / "model"), unet=str(root / "distilled_unet.safetensors")), CPU_DTYPE).pipe
    original = load_pipeline(Sources(str(root / "model")), CPU_DTYPE).pipe
    spec = CASES["1 step, no CFG, 2 images"]
    with serve(repository, tmp_path_factory) as server:
        served = ask(server, {**spec, "steps": 2}).images
    kwargs = dict(seed=spec["seed"], steps=2, guidance=0.0, num_images=2, scheduler="euler")
    assert_close(served, diffusers_images(with_distilled, spec["prompt"], **kwargs))
    own = diffusers_images(original, spec["prompt"], **kwargs)
    assert np.abs(served.astype(int) - own.astype(int)).mean() > 5  # not the model's own UNet


def test_unet_directory_and_bad_unets(tmp_path, tiny_dir):
    distilled = build_tiny_pipeline(seed=5).unet
    distilled.save_pretrained(tmp_path / "unet_dir")
    loaded = load_unet(str(tmp_path / "unet_dir"), str(tiny_dir))
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), distilled.state_dict().values()))
    with pytest.raises(ExportError, match=r"--unet '/nowhere/unet': no such file or directory"):
        load_unet("/nowhere/unet", str(tiny_dir))
    other = build_tiny_pipeline(seed=5, arch="ssd-1b").unet
    from safetensors.torch import save_file

    save_file(other.state_dict(), tmp_path / "ssd.safetensors")
    with pytest.raises(ExportError, match=r"its weights do not fit the UNet of --model"):
        load_unet(str(tmp_path / "ssd.safetensors"), str(tiny_dir))


# --- presets, offline -----------------------------------------------------------------------------

def test_presets_resolve_to_the_documented_ids():
    assert set(PRESETS) >= {"lcm-sdxl", "sdxl-turbo", "sdxl-lightning-4step", "ssd-1b-lcm", "tcd-sdxl"}
    turbo = resolve("sdxl-turbo")
    assert (turbo.model, turbo.scheduler, turbo.default_steps, turbo.default_guidance, turbo.size) == \
        ("stabilityai/sdxl-turbo", "euler-ancestral", 1, 0.0, 512)
    lightning = resolve("sdxl-lightning-4step")
    assert lightning.unet == "ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors" and lightning.scheduler == "euler"
    assert hub_file(lightning.unet) == ("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")
    assert resolve("ssd-1b-lcm").loras == ("latent-consistency/lcm-lora-ssd-1b:1.0",)
    tcd = resolve("tcd-sdxl")
    assert (tcd.scheduler, tcd.eta, tcd.loras) == ("tcd", 0.3, ("h1t/TCD-SDXL-LoRA:1.0",))
    assert resolve(None) == PRESETS["lcm-sdxl"]
    # Flags beside a preset override it; without a preset, --lora adds to the default's; --model alone: custom.
    assert resolve("tcd-sdxl", scheduler="ddim", eta=0.1, loras=("x:0.5",)).loras == ("x:0.5",)
    assert resolve(None, loras=("style:0.8",)).loras == ("latent-consistency/lcm-lora-sdxl:1.0", "style:0.8")
    assert resolve(None, model="/m", scheduler="euler") == custom_recipe("/m", "euler")
    with pytest.raises(ValueError, match="--preset 'turbo': expected one of lcm-sdxl, sdxl-turbo"):
        resolve("turbo")
    for recipe in PRESETS.values():
        assert recipe.licence and recipe.scheduler in SCHEDULERS


OFFLINE_RUNS = """
import contextlib, io, sys
from export.cli import main
for args in {runs!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    print(repr((code, err.getvalue())))
"""


def run_offline(runs: list[list[str]]) -> list[tuple[int, str]]:
    """`python -m export` runs in one fresh interpreter with HF_HUB_OFFLINE=1: no hub, whatever the
    network (huggingface_hub reads the variable at import)."""
    import ast
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", OFFLINE_RUNS.format(runs=runs)], cwd=layout.REPO_ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("(")]


def test_preset_and_hub_file_ids_fail_clearly_without_network(tiny_dir, tmp_path):
    presets = sorted(PRESETS)
    hub_files = [("--unet", "ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors"),
                 ("--lora", "ByteDance/Hyper-SD/Hyper-SDXL-4steps-lora.safetensors")]
    runs = [["onnx", "--preset", preset, "--out", str(tmp_path)] for preset in presets]
    runs += [["onnx", "--model", str(tiny_dir), flag, source, "--dtype", CPU_DTYPE, "--out", str(tmp_path)]
             for flag, source in hub_files]
    results = run_offline(runs)
    assert len(results) == len(runs)
    for preset, (code, err) in zip(presets, results):
        assert code == 2, err
        assert f"[export] recipe {preset}: {PRESETS[preset].model}" in err
        assert (f"error: --model {PRESETS[preset].model!r}: not a local directory, and the Hugging Face Hub could not "
                "provide it (HF_HUB_OFFLINE is set)") in err
    for (flag, source), (code, err) in zip(hub_files, results[len(presets):]):
        assert code == 2 and f"error: {flag} {source!r}: not a local directory, and the Hugging Face Hub could not provide it" in err, err


def test_bad_scheduler_flags(capsys, tmp_path):
    with pytest.raises(SystemExit):
        export_main(["onnx", "--scheduler", "dpm", "--out", str(tmp_path)])
    assert "argument --scheduler: invalid choice: 'dpm'" in capsys.readouterr().err
    assert export_main(["onnx", "--preset", "tcd-sdxl", "--eta", "2", "--out", str(tmp_path)]) == 2
    assert "eta 2: expected a number from 0 to 1" in capsys.readouterr().err


def test_configs_follow_the_recorded_recipe_and_reset_to_the_default(exported, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(exported(CPU_DTYPE), repository)
    recipe = Recipe("tiny-euler", "m", "euler", default_steps=3, max_steps=5)
    (layout.version_dir(repository, "scheduler") / layout.RECIPE_FILE).write_text(recipe.to_json())
    assert export_main(["configs", "--repository", str(repository)]) == 0
    assert parameters(read_config(repository, "scheduler"))["default_steps"] == "3"
    (layout.version_dir(repository, "scheduler") / layout.RECIPE_FILE).unlink()
    assert export_main(["configs", "--repository", str(repository)]) == 0
    assert parameters(read_config(repository, "scheduler", "cpu"))["recipe"] == "lcm-sdxl"
