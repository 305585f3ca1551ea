"""perf/*.json: perf_analyzer input data that the endpoint accepts, and that perf_analyzer runs."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks.perf_data import entries as image_entries
from benchmarks.perf_data import jpeg_entries
from contract.limits import Limits
from serving.endpoint import IMAGE_INPUTS, INPUTS, OUTPUT_INPUTS, check_options, check_prompts

PERF = Path(__file__).resolve().parent.parent / "perf"
DTYPES = {"STRING": object, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "UINT8": np.uint8}
CPU, PRODUCTION = Limits(min_size=128), Limits()
FILES = {"ensemble_sdxl_cpu.json": (CPU, ()), "ensemble_sdxl_1024.json": (PRODUCTION, ()),
         "img2img_cpu.json": (CPU, ("image", "strength")), "inpaint_cpu.json": (CPU, ("image", "strength", "mask")),
         "ensemble_sdxl_jpeg_cpu.json": (CPU, ("output_format", "output_quality")),
         "ensemble_sdxl_jpeg_1024.json": (PRODUCTION, ("output_format", "output_quality"))}


def request_arrays(entry: dict, declared) -> dict:
    """An entry as the server receives it (perf_analyzer sends "b64" values as their raw bytes)."""
    raw = {}
    for spec in declared:
        value = entry[spec.name]
        if isinstance(value, dict):
            raw[spec.name] = np.frombuffer(base64.b64decode(value["b64"]), dtype=DTYPES[spec.dtype]).reshape(value["shape"])
        else:
            raw[spec.name] = np.array(value, dtype=DTYPES[spec.dtype])
    raw["prompt"] = np.array([entry["prompt"][0].encode()], dtype=object)
    return raw


@pytest.mark.parametrize("name", FILES)
def test_every_entry_is_a_valid_request(name):
    limits, image_inputs = FILES[name]
    declared = [*INPUTS, *(i for i in (*IMAGE_INPUTS, *OUTPUT_INPUTS) if i.name in image_inputs)]
    entries = json.loads((PERF / name).read_text())["data"]
    assert len(entries) >= 4
    for entry in entries:
        assert set(entry) == {i.name for i in declared}, "every optional input set, so each run measures the same work"
        raw = request_arrays(entry, declared)
        check_prompts(raw)
        options = check_options(raw, limits)
        assert (options.strength is not None, options.inpainting) == ("image" in image_inputs, "mask" in image_inputs)
        assert options.output.format == ("jpeg" if "output_format" in image_inputs else "raw")
    assert {e["guidance_scale"][0] > 1 for e in entries} == {True, False}, "CFG and non-CFG requests both"
    assert len({len(e["prompt"][0]) for e in entries}) == len(entries), "prompts of different lengths"


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_image_data_is_what_the_generator_writes(kind):
    committed = json.loads((PERF / f"{kind}_cpu.json").read_text())["data"]
    assert committed == image_entries(128, inpainting=kind == "inpaint")


@pytest.mark.parametrize("size", ["cpu", "1024"])
def test_jpeg_data_is_what_the_generator_writes(size):
    committed = json.loads((PERF / f"ensemble_sdxl_jpeg_{size}.json").read_text())["data"]
    assert committed == jpeg_entries(PERF / f"ensemble_sdxl_{size}.json")


@pytest.mark.parametrize("data", ["ensemble_sdxl_cpu.json", "inpaint_cpu.json", "ensemble_sdxl_jpeg_cpu.json"])
def test_perf_analyzer_runs_the_cpu_data(triton, tmp_path, data):
    from benchmarks.throughput import admin_header_args, perf_analyzer_binary

    binary = perf_analyzer_binary()  # the benchmark's lookup: $PERF_ANALYZER, ../shared/tools, PATH
    if not Path(binary).exists() and shutil.which(binary) is None:
        pytest.skip(f"no perf_analyzer here ({binary})")
    csv = tmp_path / "perf.csv"
    result = subprocess.run(
        [binary, "-m", "ensemble_sdxl", "-u", triton.grpc_url, "-i", "grpc", *admin_header_args(triton), "--input-data", str(PERF / data),
         "--concurrency-range", "2", "--measurement-mode", "count_windows", "--measurement-request-count", "8",
         "--stability-percentage", "999", "-f", str(csv)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Inferences/Second" in csv.read_text()
