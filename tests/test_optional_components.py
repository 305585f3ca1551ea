"""A command that needs a component this machine lacks says so in one `error:` line, with the command
that installs it, and exits non-zero; no traceback."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from contract.layout import REPO_ROOT
from serving.server import ServerError, TritonServer


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                          capture_output=True, text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_engines_without_tensorrt(tmp_path):
    result = run([sys.executable, "-m", "export", "engines", "--out", str(tmp_path)], POLYGRAPHY_USE_TENSORRT_RTX="0")
    assert result.returncode == 2
    assert one_error_line(result) == (
        "error: TensorRT is not installed (no module tensorrt): on a GPU machine run `make install-gpu` (the TensorRT of the "
        "Triton release that serves the plans, TRT_VERSION); without a GPU, build TensorRT-RTX engines with `make engines-rtx`")
    assert [line for line in result.stderr.splitlines() if line.strip()] == [one_error_line(result)], "only the error line"


def test_production_variant_needs_nvidias_tritonserver(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no tritonserver on it
    with pytest.raises(ServerError, match=r"^the production variant needs NVIDIA's tritonserver with the TensorRT backend"):
        TritonServer(tmp_path, "production").start()
    result = run([sys.executable, "-m", "serving.server", "--variant", "production", "--repository", str(tmp_path)],
                 PATH=os.path.dirname(sys.executable), TRITONSERVER="")
    assert result.returncode == 2
    assert "set TRITONSERVER=/path/to/tritonserver; without a GPU, use --variant cpu" in one_error_line(result)


def test_production_variant_needs_the_plans(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONSERVER", "/bin/false")  # found; never started: the check comes first
    with pytest.raises(ServerError, match=r"^no TensorRT plans \(text_encoder/1/model.plan, unet/1/model.plan, unet_lora/1/model.plan, "
                                          r"vae_decoder/1/model.plan, preview_decoder/1/model.plan, vae_encoder/1/model.plan, "
                                          r"safety_checker/1/model.plan\) in .*: "
                                          r"build them with `make engines`"):
        TritonServer(tmp_path, "production").start()


def test_perf_without_perf_analyzer():
    result = run(["make", "--no-print-directory", "perf", "PERF_ANALYZER=no-such-perf-analyzer"])
    assert "error: perf_analyzer not found (no-such-perf-analyzer): install it with `pip install perf-analyzer`" in one_error_line(result)
