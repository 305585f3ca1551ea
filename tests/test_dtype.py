"""The configs follow the exported dtype; a graph and a config that disagree fail the load, never a request."""

from __future__ import annotations

import re
import shutil

import pytest
import tritonclient.http as http

from contract import configs
from contract.configs import CPU_DTYPE, DTYPE_MODELS, config_files, declared_types, dtype_problems, read_config
from contract.layout import DEFAULT_REPOSITORY, REPO_ROOT
from contract.networks import compute_tensors
from export.cli import main
from serving.server import ServerError, TritonServer, free_port


def declared_compute(repository, model) -> set[str]:
    """The types each config variant of `model` declares for its export-dtype tensors."""
    found = set()
    for path in config_files(repository, model):
        variant = "production" if path.name == "config.pbtxt" else path.stem
        found |= set(declared_types(read_config(repository, model, variant), compute_tensors(model)).values())
    return found


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_sets_every_config_to_its_dtype(exported, dtype):
    repository = exported(dtype)
    for model in DTYPE_MODELS:
        assert len(config_files(repository, model)) == 2, model  # production and cpu variants
        assert declared_compute(repository, model) == {dtype.upper()}, model
    assert dtype_problems(repository, "cpu") == dtype_problems(repository, "production") == []


def test_only_the_dtype_changes(exported):
    """Everything else in the configs, comments included, is the repository's own."""
    repository = exported("fp32")
    for model in DTYPE_MODELS:
        for path in config_files(repository, model):
            ours = (DEFAULT_REPOSITORY / path.relative_to(repository)).read_text()
            assert path.read_text().replace("TYPE_FP32", "TYPE_FP16") == ours.replace("TYPE_FP32", "TYPE_FP16")
    # The inputs that are FP32 in every export (timestep, guidance_scale) stay so in the fp16 configs.
    assert declared_types(read_config(DEFAULT_REPOSITORY, "unet"), ["timestep"]) == {"timestep": "FP32"}


def test_configs_in_git_are_the_production_dtype():
    for model in DTYPE_MODELS:
        assert declared_compute(DEFAULT_REPOSITORY, model) == {configs.PRODUCTION_DTYPE.upper()}, model


def test_makefile_default_is_the_cpu_dtype():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^DTYPE \?= (\w+)", makefile, re.M).group(1) == CPU_DTYPE


@pytest.fixture
def mismatched(exported, tmp_path):
    """The fp32 graphs with the fp16 configs of git, as after `git checkout model_repository/`."""
    repository = tmp_path / "repo"
    shutil.copytree(exported("fp32"), repository)
    for model in DTYPE_MODELS:
        for path in config_files(repository, model):
            shutil.copy(DEFAULT_REPOSITORY / path.relative_to(repository), path)
    return repository


def test_mismatch_is_named_with_the_fix(mismatched):
    problems = dtype_problems(mismatched, "cpu")
    assert [p.split(":")[0] for p in problems] == list(DTYPE_MODELS)
    unet = next(p for p in problems if p.startswith("unet:"))
    assert unet == (
        "unet: the graphs were exported in fp32 (sample is FP32 in unet/1/model.onnx), but unet/configs/cpu.pbtxt "
        f"declares TYPE_FP16 for sample; make the configs follow the graphs with `python -m export configs "
        f"--repository {mismatched}` (or export again with --dtype fp16)"
    )
    assert "scheduler: the graphs were exported in fp32 (prompt_embeds is FP32 in text_encoder/1/model.onnx)" in problems[-1]


def test_the_launcher_refuses_to_start_a_mismatch(mismatched, tmp_path):
    server = TritonServer(mismatched, "cpu", free_port(), free_port(), free_port(), log_file=tmp_path / "log")
    with pytest.raises(ServerError, match=r"(?s)^text_encoder: the graphs were exported in fp32.*\nunet: .*\nvae_decoder: .*\nscheduler: "):
        server.start()
    assert server.process is None, "tritonserver was started"


def test_export_configs_fixes_a_mismatch(mismatched, capsys):
    assert main(["configs", "--repository", str(mismatched)]) == 0
    out = capsys.readouterr().out
    assert f"{mismatched / 'unet' / 'configs' / 'cpu.pbtxt'}: set to fp32" in out
    assert dtype_problems(mismatched, "cpu") == dtype_problems(mismatched, "production") == []
    assert main(["configs", "--repository", str(mismatched)]) == 0
    assert "(nothing to change)" in capsys.readouterr().out


def test_export_configs_without_graphs(tmp_path, capsys):
    assert main(["configs", "--repository", str(tmp_path)]) == 2
    assert "no exported graphs" in capsys.readouterr().err


def test_triton_fails_the_load_of_a_mismatched_model(mismatched, tmp_path):
    """Started past the launcher's check: the model's own load fails, with the same message."""
    server = TritonServer(mismatched, "cpu", free_port(), free_port(), free_port(), log_file=tmp_path / "log",
                          extra_args=["--model-control-mode=explicit"], check_configs=False)
    with server:
        client = http.InferenceServerClient(server.http_url)
        for model, tensor, graph in (("unet", "sample", "unet/1/model.onnx"),
                                     ("scheduler", "prompt_embeds", "text_encoder/1/model.onnx")):
            with pytest.raises(Exception) as error:
                client.load_model(model)
            assert (f"{model}: the graphs were exported in fp32 ({tensor} is FP32 in {graph}), but "
                    f"{model}/configs/cpu.pbtxt declares TYPE_FP16 for {tensor}") in str(error.value)
            assert not client.is_model_ready(model)
        client.close()
