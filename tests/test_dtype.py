"""The configs follow the export (dtype and widths); a graph and a config that disagree fail the
load, never a request."""

from __future__ import annotations

import re
import shutil

import pytest
import tritonclient.http as http
from helpers import graph_model, running

from contract import configs
from contract.configs import (CPU_DTYPE, EXPORTED_MODELS, config_files, config_problems, declared_interface,
                              read_config, repository_export)
from contract import layout
from contract.layout import REPO_ROOT, TEMPLATES, served_networks
from contract.networks import CONTROLNET_NAME, REFINER_UNET_NAME, UNION_CONTROLNET_NAME, SDXL_DIMS, TOKENIZER, compute_tensors
from contract.recipes import RECIPE_PARAMETERS

from export.cli import main
from serving.server import ServerError, TritonServer, free_ports


def variants(repository, model):
    for path in config_files(repository, model):
        yield read_config(repository, model, "production" if path.name == "config.pbtxt" else path.stem)


def declared_compute(repository, model) -> set[str]:
    """The types each config variant of `model` declares for its export-dtype tensors."""
    return {declared_interface(config)[name][0] for config in variants(repository, model) for name in compute_tensors(model)}


def declared_dims(repository, model, tensor) -> set[tuple[int, ...]]:
    return {tuple(declared_interface(config)[tensor][1]) for config in variants(repository, model)}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_sets_every_config_to_its_dtype(exported, refined, dtype):
    repository = exported(dtype)
    assert not (repository / REFINER_UNET_NAME).exists()  # only where the recipe has a refiner: refined(dtype)
    assert not (repository / CONTROLNET_NAME).exists()  # a template: the ControlNet's model is controlnet_tiny
    assert layout.controlnet_models(repository) == ["controlnet_canny", graph_model(CONTROLNET_NAME), graph_model(UNION_CONTROLNET_NAME)]
    for name in EXPORTED_MODELS:
        holder = refined(dtype)[1] if name == REFINER_UNET_NAME else repository
        model = graph_model(name)
        # production and cpu variants; the tokenizer (Python backend either way) has one config
        assert len(config_files(holder, model)) == (1 if model == TOKENIZER else 2), model
        # safety_checker takes and gives FP32 in every export (its graph casts): no export-dtype tensor
        assert declared_compute(holder, model) == ({dtype.upper()} if compute_tensors(model) else set()), model
    assert config_problems(repository, "cpu") == config_problems(repository, "production") == []


def test_export_sets_the_exported_widths(exported):
    """The tiny pipeline's embeddings are 80 and 40 wide (SDXL's: 2048 and 1280): both variants say so."""
    repository = exported("fp16")
    assert declared_dims(repository, "text_encoder", "prompt_embeds") == {(-1, 77, 80)}
    assert declared_dims(repository, "unet", "text_embeds") == {(-1, 40)}
    assert declared_dims(repository, "scheduler", "pooled_prompt_embeds") == {(-1, 40)}
    assert declared_dims(TEMPLATES, "scheduler", "prompt_embeds") == {(-1, 77, 2048)}


def test_only_the_dtype_and_widths_change(exported):
    """Everything else in the configs, comments included, is the repository's own."""
    repository = exported("fp32")
    tiny = repository_export(repository)[1]
    lora_widths = {getattr(tiny, key): getattr(SDXL_DIMS, key) for key in ("unet_lora_in", "unet_lora_out", "text_lora_in", "text_lora_out")}

    def normalized(text: str) -> str:
        # The recipe parameters follow the export too (contract/recipes.py); the rest must not move.
        text = "\n".join(line for line in text.splitlines()
                         if not any(f'key: "{key}"' in line for key in RECIPE_PARAMETERS))
        text = text.replace("TYPE_FP32", "TYPE_FP16").replace(", 80 ]", ", 2048 ]").replace("[ 80 ]", "[ 2048 ]") \
            .replace(", 40 ]", ", 1280 ]").replace("[ 40 ]", "[ 1280 ]").replace(f"[ {tiny.ip_layers} ]", f"[ {SDXL_DIMS.ip_layers} ]")
        for ours, sdxl in lora_widths.items():  # the LoRA inputs' widths: the sums over the sites
            text = text.replace(f" {ours} ]", f" {sdxl} ]").replace(f"[ {ours},", f"[ {sdxl},").replace(f", {ours}, ", f", {sdxl}, ")
        return text

    for model in EXPORTED_MODELS:
        for path in config_files(repository, model):
            assert normalized(path.read_text()) == normalized((TEMPLATES / path.relative_to(repository)).read_text())
    # The inputs that are FP32 in every export (timestep, guidance_scale) stay so in the fp16 configs.
    assert declared_interface(read_config(TEMPLATES, "unet"))["timestep"] == ("FP32", [-1])


def test_configs_in_git_are_the_production_dtype():
    for model in EXPORTED_MODELS:
        assert declared_compute(TEMPLATES, model) == ({configs.PRODUCTION_DTYPE.upper()} if compute_tensors(model) else set()), model


def test_makefile_default_is_the_cpu_dtype():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^DTYPE \?= (\w+)", makefile, re.M).group(1) == CPU_DTYPE


@pytest.fixture
def mismatched(exported, tmp_path):
    """The fp32 graphs with the fp16 configs of git, as after `git checkout model_repository/`."""
    repository = tmp_path / "repo"
    shutil.copytree(exported("fp32"), repository)
    for model in EXPORTED_MODELS:
        for path in config_files(repository, model):
            shutil.copy(TEMPLATES / path.relative_to(repository), path)
    return repository


def test_mismatch_is_named_with_the_fix(mismatched):
    problems = config_problems(mismatched, "cpu")
    # not safety_checker: FP32 always; no refiner here; the ControlNets' models (controlnet_tiny...) are not in git,
    # so a checkout leaves its configs as the export wrote them
    assert [p.split(":")[0] for p in problems] == [
        m for m in EXPORTED_MODELS if compute_tensors(m) and m not in (REFINER_UNET_NAME, CONTROLNET_NAME, UNION_CONTROLNET_NAME)]
    unet = next(p for p in problems if p.startswith("unet:"))
    assert unet == (
        "unet: the graphs were exported in fp32 (sample is FP32 in unet/1/model.onnx), but unet/configs/cpu.pbtxt "
        f"declares TYPE_FP16 for sample; make the configs follow the graphs with `python -m export configs "
        f"--repository {mismatched}` (or export again with --dtype fp16)"
    )
    for loop_model, problem in zip(("scheduler", "denoiser"), problems[-2:]):
        assert f"{loop_model}: the graphs were exported in fp32 (prompt_embeds is FP32 in text_encoder/1/model.onnx)" in problem


def test_width_mismatch_is_named(exported, tmp_path):
    """The tiny graphs (80 wide) with the SDXL configs of git (2048), same dtype."""
    repository = tmp_path / "repo"
    shutil.copytree(exported("fp16"), repository)
    for path in config_files(repository, "unet"):
        shutil.copy(TEMPLATES / path.relative_to(repository), path)
    assert config_problems(repository, "cpu") == [
        "unet: encoder_hidden_states has dims [-1, 77, 80] in unet/1/model.onnx (-1: dynamic), but unet/configs/cpu.pbtxt "
        f"declares [-1, 77, 2048] (batch first); make the configs follow the graphs with `python -m export configs "
        f"--repository {repository}`"]


def test_the_launcher_refuses_to_start_a_mismatch(mismatched, tmp_path):
    server = TritonServer(mismatched, "cpu", *free_ports(3), log_file=tmp_path / "log")
    with pytest.raises(ServerError, match=r"(?s)^text_encoder: the graphs were exported in fp32.*\nunet: .*\nvae_decoder: .*\nscheduler: "):
        server.start()
    assert server.process is None, "tritonserver was started"


def test_export_configs_fixes_a_mismatch(mismatched, capsys):
    assert main(["configs", "--repository", str(mismatched)]) == 0
    out = capsys.readouterr().out
    assert f"{mismatched / 'unet' / 'configs' / 'cpu.pbtxt'}: updated" in out
    assert config_problems(mismatched, "cpu") == config_problems(mismatched, "production") == []
    assert main(["configs", "--repository", str(mismatched)]) == 0
    assert "(nothing to change)" in capsys.readouterr().out


def test_export_configs_without_graphs(tmp_path, capsys):
    assert main(["configs", "--repository", str(tmp_path)]) == 2
    assert "no exported graphs" in capsys.readouterr().err


def test_triton_fails_the_load_of_a_mismatched_model(mismatched, tmp_path):
    """Started past the launcher's check: the model's own load fails, with the same message."""
    server = TritonServer(mismatched, "cpu", *free_ports(3), log_file=tmp_path / "log",
                          extra_args=["--model-control-mode=explicit"], check_configs=False)
    with running(server):
        client = http.InferenceServerClient(server.http_url)
        for model, tensor, graph in (("unet", "sample", "unet/1/model.onnx"),
                                     ("scheduler", "prompt_embeds", "text_encoder/1/model.onnx")):
            with pytest.raises(Exception) as error:
                client.load_model(model, headers=server.admin_headers())
            assert (f"{model}: the graphs were exported in fp32 ({tensor} is FP32 in {graph}), but "
                    f"{model}/configs/cpu.pbtxt declares TYPE_FP16 for {tensor}") in str(error.value)
            assert not client.is_model_ready(model)
        client.close()


def test_export_configs_dtype_restores_the_git_configs(exported, tmp_path, capsys):
    """`export configs --dtype fp16` puts a repository's configs back to what git holds once its
    graphs are gone."""
    repository = tmp_path / "repo"
    shutil.copytree(exported("fp32"), repository)  # the tiny graphs' widths, fp32
    for name in served_networks(repository):
        (repository / name / "1" / "export.json").unlink()  # the graphs removed
    (repository / "scheduler" / "1" / "recipe.json").unlink()
    assert main(["configs", "--repository", str(repository), "--dtype", "fp16"]) == 0
    assert "configs declare fp16 and SDXL's widths (no exported graphs), recipe lcm-sdxl" in capsys.readouterr().out
    for model in EXPORTED_MODELS:
        for path in config_files(repository, model):
            assert path.read_text() == (TEMPLATES / path.relative_to(repository)).read_text()


def test_export_configs_dtype_must_agree_with_the_graphs(exported, tmp_path, capsys):
    repository = tmp_path / "repo"
    shutil.copytree(exported("fp32"), repository)
    assert main(["configs", "--repository", str(repository), "--dtype", "fp16"]) == 2
    assert "its graphs were exported in fp32; configs in fp16 would not match them" in capsys.readouterr().err
    assert declared_compute(repository, "unet") == {"FP32"}
