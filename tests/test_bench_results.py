"""Where the benchmarks write: RESULTS_DIR (benchmarks/measure.py), $BENCH_RESULTS or build/results/,
ignored by git, so that running a benchmark leaves a clone as git has it. Parsers only, nothing runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import (controlnet, engine, faults, fuzz, gpu, img2img, ipadapter, lora, measure, outputs, painting, quantization, refiner,
                        scale, security, soak, streaming, throughput)
from contract.layout import REPO_ROOT

# Each benchmark's parser builder and its default results prefix, under RESULTS_DIR (file names as before).
PARSERS = {controlnet: "controlnet_cpu", ipadapter: "ipadapter_cpu", engine: "engine_cpu", faults: "faults_cpu", fuzz: "fuzz", img2img: "img2img_cpu", lora: "lora_cpu", outputs: "outputs_cpu",
           painting: "painting_cpu", quantization: "quantization_cpu", refiner: "refiner_cpu", scale: "scale_cpu", security: "security_cpu", soak: "soak", streaming: "stream_cpu", throughput: "throughput_cpu"}


def test_results_dir_defaults_under_build():
    assert measure.results_dir({}) == REPO_ROOT / "build" / "results" == measure.DEFAULT_RESULTS_DIR
    assert measure.results_dir({"BENCH_RESULTS": ""}) == measure.DEFAULT_RESULTS_DIR


def test_results_dir_honours_bench_results(tmp_path):
    assert measure.results_dir({"BENCH_RESULTS": "benchmarks/results"}) == REPO_ROOT / "benchmarks" / "results"
    assert measure.results_dir({"BENCH_RESULTS": str(tmp_path)}) == tmp_path
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    printed = subprocess.run([sys.executable, "-c", "from benchmarks import measure; print(measure.RESULTS_DIR)"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert printed == str(tmp_path)  # read from the environment at import, as the Makefile exports it


@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="not a git clone")
def test_default_results_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "-q", "build/results/engine_cpu.json"], cwd=REPO_ROOT)
    assert ignored.returncode == 0


@pytest.mark.parametrize("module", PARSERS, ids=lambda m: m.__name__)
def test_every_out_default_lies_under_results_dir(module, monkeypatch, tmp_path):
    name = PARSERS[module]
    assert module.build_parser().parse_args([]).out == measure.RESULTS_DIR / name
    monkeypatch.setattr(measure, "RESULTS_DIR", tmp_path)  # followed when the parser is built
    assert module.build_parser().parse_args([]).out == tmp_path / name
    assert module.build_parser().parse_args(["--out", "elsewhere/x"]).out == Path("elsewhere/x")


def test_gpu_out_default_lies_under_results_dir(monkeypatch, tmp_path):
    import torch

    assert gpu.parse_args(["--device", "cpu"]).out is None  # the default needs the GPU's name
    monkeypatch.setattr(measure, "RESULTS_DIR", tmp_path)
    assert gpu.default_out(torch.device("cpu")) == tmp_path / "gpu_cpu-smoke"


def test_faults_partial_file_beside_its_results(tmp_path):
    assert faults.partial_path(tmp_path / "faults_cpu") == tmp_path / "faults_cpu.partial.json"


def test_recorded_command_says_where_the_results_went(monkeypatch):
    monkeypatch.setattr(measure, "RESULTS_DIR", measure.DEFAULT_RESULTS_DIR)
    assert measure.results_env() == ""  # build/results: the plain command
    monkeypatch.setattr(measure, "RESULTS_DIR", REPO_ROOT / "benchmarks" / "results")
    assert measure.results_env() == "BENCH_RESULTS=benchmarks/results "
    assert measure.results_env(default_out=False) == ""  # --out given: the command names it
    record = measure.run_record("benchmarks.engine", [], 0.0)
    assert record["command"] == "BENCH_RESULTS=benchmarks/results python -m benchmarks.engine"


def test_merge_falls_back_to_the_committed_results(tmp_path):
    said = []
    committed = json.loads((measure.COMMITTED_RESULTS / "faults_cpu.json").read_text())
    assert measure.existing_results(tmp_path / "faults_cpu.json", said.append) == committed
    assert len(said) == 1 and "benchmarks/results/faults_cpu.json" in said[0]
    (tmp_path / "faults_cpu.json").write_text('{"queue_bound": {}}')
    assert measure.existing_results(tmp_path / "faults_cpu.json", said.append) == {"queue_bound": {}}
    assert measure.existing_results(tmp_path / "nothing.json", said.append) is None
