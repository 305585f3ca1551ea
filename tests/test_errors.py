"""Bad input to the exporter gets one clear message naming the flag and the value; no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.cli import main
from export.onnx_export import export_pipeline
from export.sources import ExportError, LoraSpec, Sources, load_pipeline
from export.tiny import _unet, write_random_lora

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no hub, whatever the network: deterministic
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_unknown_model_id_without_hub(tmp_path):
    result = run_cli("onnx", "--model", "nobody/no-such-sdxl", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "error: --model 'nobody/no-such-sdxl': not a local directory, and the Hugging Face Hub could not provide it" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir()), "nothing written"


def test_missing_local_model(tmp_path):
    with pytest.raises(ExportError, match=r"--model '/no/such/dir': no such file or directory"):
        load_pipeline(Sources("/no/such/dir"))


def test_directory_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ExportError, match=r"--model .*: cannot load it: .*model_index.json"):
        load_pipeline(Sources(str(tmp_path)))


def test_lora_that_does_not_fit_the_unet(tiny_dir, tmp_path):
    torch.manual_seed(0)
    write_random_lora(_unet(text_dim=96, pooled_dim=40), tmp_path, seed=5)  # cross-attention 96 wide, not 80
    with pytest.raises(ExportError) as error:
        load_pipeline(Sources(str(tiny_dir), (LoraSpec(str(tmp_path)),)))
    message = str(error.value)
    assert message.startswith(f"--lora {str(tmp_path)!r}: does not fit this model's UNet/text encoders: ")
    assert "LoRA [4, 96], model [4, 80]" in message


def test_lora_that_matches_no_layer(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"unet.foo.bar.lora_A.weight": torch.zeros(4, 8), "unet.foo.bar.lora_B.weight": torch.zeros(8, 4)}, path)
    with pytest.raises(ExportError, match="none of its weights match a layer"):
        load_pipeline(Sources(str(tiny_dir), (LoraSpec(str(path)),)))


def test_missing_lora(tiny_dir):
    with pytest.raises(ExportError, match=r"--lora '/no/such/lora': no such file or directory"):
        load_pipeline(Sources(str(tiny_dir), (LoraSpec("/no/such/lora"),)))


@pytest.mark.parametrize("text,bad", [("some/lora:abc", "'abc'"), ("some/lora:nan", "'nan'"), ("some/lora:", "''"), ("x:inf", "'inf'")])
def test_bad_lora_weight(text, bad):
    with pytest.raises(ExportError, match=f"bad weight {bad}; expected a finite number"):
        LoraSpec.parse(text)


def test_bad_lora_weight_from_cli(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["onnx", "--lora", "latent-consistency/lcm-lora-sdxl:heavy"])
    assert exit_.value.code == 2
    assert "bad weight 'heavy'" in capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [("a/b", ("a/b", 1.0)), ("a/b:0.8", ("a/b", 0.8)), ("/x/y.safetensors:-0.5", ("/x/y.safetensors", -0.5))])
def test_lora_spec_parses(text, expected):
    spec = LoraSpec.parse(text)
    assert (spec.source, spec.weight) == expected


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["onnx", "--model", "/no/such/dir", "--out", str(blocker / "repo")]) == 2
    err = capsys.readouterr().err
    assert f"error: --out '{blocker / 'repo'}': cannot write there" in err
    assert "--model" not in err, "the output is checked before any loading"


def test_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["onnx", "--device", "cuda", "--out", "/tmp/unused"]) == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", "x", str(2**32)])
def test_bad_tiny_seed(seed, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["tiny", str(tmp_path), "--seed", seed])
    assert f"--seed {seed!r}: expected an integer" in capsys.readouterr().err


def test_long_steps_print_progress(loaded, tmp_path, capsys):
    export_pipeline(loaded("fp32"), tmp_path, "fp32", names=("vae_decoder",))
    err = capsys.readouterr().err
    assert "[export] vae_decoder: tracing to ONNX (fp32, opset 17) ..." in err
    assert "[export] vae_decoder: tracing to ONNX (fp32, opset 17): done in" in err
    assert "[export] stage 1/2: vae_decoder (from vae)" in err
    assert "[export] vae_decoder: model.onnx checked, " in err
    assert f"[export] graphs, tokenizers and scheduler_config.json (LCMScheduler, recipe custom) written under {tmp_path}" in err


def test_preview_vae_is_the_flag_else_the_models_own_else_taesdxl(tiny_dir, tmp_path):
    assert Sources(str(tiny_dir)).resolved_preview_vae == str(tiny_dir / "preview_vae")
    assert Sources(str(tiny_dir), preview_vae="other/taesd").resolved_preview_vae == "other/taesd"
    assert Sources("stabilityai/stable-diffusion-xl-base-1.0").resolved_preview_vae == "madebyollin/taesdxl"
    with pytest.raises(ExportError, match=r"^--preview-vae '/no/such/taesd': no such file or directory"):
        load_pipeline(Sources(str(tiny_dir), preview_vae="/no/such/taesd"), components=("preview_vae",))
    with pytest.raises(ExportError, match=r"^--preview-vae .*: cannot load it"):
        load_pipeline(Sources(str(tiny_dir), preview_vae=str(tmp_path)), components=("preview_vae",))
    loaded = load_pipeline(Sources(str(tiny_dir), preview_vae=str(tiny_dir)), components=("preview_vae",))  # a pipeline dir
    assert type(loaded.pipe.preview_vae).__name__ == "AutoencoderTiny" and loaded.pipe.unet is None
