"""ONNX Runtime session options for an exported graph, by what export.json says it is."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from contract import layout


def session_options(graph: Path) -> ort.SessionOptions:
    """ONNX Runtime's defaults, but FP8 graphs run at the basic optimization level: at the extended
    level, ONNX Runtime 1.31 fuses DequantizeLinear -> MatMul into MatMulIntegerToFloat, which takes
    no FLOAT8E4M3FN input, and the session fails to load. Its CPU kernels simulate FP8 either way
    (Conv and MatMul are float on a CPU)."""
    options = ort.SessionOptions()
    if layout.graph_precision(Path(graph).parent) == "fp8":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return options
