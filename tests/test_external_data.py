"""Graphs over the threshold (2 GB in production) are saved with their weights in model.onnx.data."""

from __future__ import annotations

from helpers import assert_close, ort_session, run_onnx, run_torch

from contract import layout, networks
from export.modules import build_module
from contract.networks import ModelDims
from export.onnx_export import EXTERNAL_DATA_THRESHOLD, example_inputs, export_network


def test_unet_over_threshold_goes_to_external_data(loaded, tmp_path):
    pipe = loaded("fp32").pipe
    dims = ModelDims.from_pipeline(pipe)
    module = build_module("unet", pipe)
    out_dir = tmp_path / "unet" / "1"
    # The tiny fp32 UNet is ~9 MB of weights and ~3 MB of graph (its LoRA sites' nodes): a 5 MB
    # threshold stands in for the 2 GB protobuf limit.
    export_network(module, networks.UNET, dims, "fp32", out_dir, external_data_threshold=5_000_000)
    graph, data = out_dir / layout.ONNX_FILE, out_dir / layout.ONNX_DATA_FILE
    # Tensors under 1 KB (biases, norms) stay inline, as onnx.save_model does by default.
    assert data.stat().st_size > 8_000_000 > 5_000_000 > graph.stat().st_size
    assert sorted(p.name for p in out_dir.iterdir()) == [layout.ONNX_FILE, layout.ONNX_DATA_FILE], "temporary files left"

    inputs = example_inputs(networks.UNET, dims, "FP32", batch=2, latent_height=16, latent_width=16)
    (expected,) = run_torch(module, inputs)
    (actual,) = run_onnx(ort_session(tmp_path, "unet"), inputs)
    assert_close(actual, expected, "fp32", "unet from external data")

    # Re-exported under the threshold: one file, and the stale data file is gone.
    export_network(module, networks.UNET, dims, "fp32", out_dir)
    assert not data.exists() and graph.stat().st_size > 8_000_000


def test_production_threshold_is_below_protobuf_limit():
    assert 1.9 * 1024**3 < EXTERNAL_DATA_THRESHOLD < 2 * 1024**3
