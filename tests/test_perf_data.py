"""perf/*.json: perf_analyzer input data that the endpoint accepts, and that perf_analyzer runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from contract.limits import Limits
from serving.endpoint import INPUTS, check_options, check_prompts

PERF = Path(__file__).resolve().parent.parent / "perf"
DTYPES = {"STRING": object, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}
FILES = {"ensemble_sdxl_cpu.json": Limits(min_size=128), "ensemble_sdxl_1024.json": Limits()}


@pytest.mark.parametrize("name", FILES)
def test_every_entry_is_a_valid_request(name):
    entries = json.loads((PERF / name).read_text())["data"]
    assert len(entries) >= 4
    for entry in entries:
        assert set(entry) == {i.name for i in INPUTS}, "every optional input set, so each run measures the same work"
        raw = {i.name: np.array(entry[i.name], dtype=DTYPES[i.dtype]) for i in INPUTS}
        raw["prompt"] = np.array([entry["prompt"][0].encode()], dtype=object)
        check_prompts(raw)
        check_options(raw, FILES[name])
    assert {e["guidance_scale"][0] > 1 for e in entries} == {True, False}, "CFG and non-CFG requests both"
    assert len({len(e["prompt"][0]) for e in entries}) == len(entries), "prompts of different lengths"


def test_perf_analyzer_runs_the_cpu_data(triton, tmp_path):
    from benchmarks.throughput import perf_analyzer_binary

    binary = perf_analyzer_binary()  # the benchmark's lookup: $PERF_ANALYZER, ../shared/tools, PATH
    if not Path(binary).exists() and shutil.which(binary) is None:
        pytest.skip(f"no perf_analyzer here ({binary})")
    csv = tmp_path / "perf.csv"
    result = subprocess.run(
        [binary, "-m", "ensemble_sdxl", "-u", triton.grpc_url, "-i", "grpc", "--input-data", str(PERF / "ensemble_sdxl_cpu.json"),
         "--concurrency-range", "2", "--measurement-mode", "count_windows", "--measurement-request-count", "8",
         "--stability-percentage", "999", "-f", str(csv)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Inferences/Second" in csv.read_text()
