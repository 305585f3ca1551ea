"""8-bit UNet (FP8, INT8) and VAE decoder (INT8): `--unet-precision` / `--vae-precision` export Q/DQ
graphs calibrated on the recipe's own loop, with the published layers kept in the export dtype;
ONNX Runtime runs them; the pipeline given to the export is left float; bad flags are named."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import QUANTIZED_NETWORKS, calibration

from contract import layout, networks
from contract.networks import ModelDims
from export.cli import main as export_main
from export.onnx_export import example_inputs, export_pipeline
from export.quantize import (DEFAULT_PROMPTS_FILE, QUANTIZED_OPSET, VAE_DECODER_KEEP, Precisions,
                             check_precisions, count_qdq, read_prompts, unet_keep)
from export.sources import ExportError
from serving.ort_session import session_options

# Output SNR against the float graph on random inputs, tiny random-weight UNet: measured 16-19 dB
# (benchmarks/results/quantization_cpu.md has the recipe's own steps). A wrong scale or a Q/DQ pair
# on the wrong tensor gives a few dB or less.
MIN_SNR_DB = {"unet": 12.0, "unet_lora": 12.0, "vae_decoder": 8.0}


def run(repository, name: str, inputs: dict) -> np.ndarray:
    path = layout.onnx_path(repository, name)
    session = ort.InferenceSession(str(path), session_options(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name] for i in session.get_inputs()}
    return session.run(None, feeds)[0].astype(np.float64)


def snr_db(reference: np.ndarray, value: np.ndarray) -> float:
    return float(10 * np.log10((reference ** 2).mean() / ((reference - value) ** 2).mean()))


def dequantized_consumers(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes with an input that a DequantizeLinear produced."""
    dq_outputs = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return {node.name for node in model.graph.node if node.op_type != "QuantizeLinear" and dq_outputs & set(node.input)}


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_graphs_carry_qdq_of_their_type(quantized, precision):
    repository = quantized(precision)
    for name in (networks.UNET.name, networks.UNET_LORA.name):
        if not layout.onnx_path(repository, name).exists():
            continue
        model = onnx.load(str(layout.onnx_path(repository, name)))
        assert model.opset_import[0].version == QUANTIZED_OPSET
        counts = count_qdq(model)
        assert set(counts) == {"INT8" if precision == "int8" else "FLOAT8E4M3FN"}, counts
        assert counts[next(iter(counts))] > 100
        info = json.loads((layout.version_dir(repository, name) / layout.EXPORT_INFO_FILE).read_text())
        assert info["precision"] == precision and info["opset"] == QUANTIZED_OPSET
        record = info["quantization"]
        assert record["calibration"]["prompts"] == 4 and record["calibration"]["size"] == 128
        assert record["calibration"]["steps"] == 4 and record["keep_pattern"] == unet_keep(precision).pattern
        assert record["quantized_layers"] > 100
        assert layout.graph_precision(layout.version_dir(repository, name)) == precision
    if precision == "fp8":  # export_pipeline's: only the networks asked for were exported (int8's is the CLI's, whole)
        assert not layout.onnx_path(repository, "text_encoder").exists()


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_published_layers_stay_in_the_export_dtype(quantized, precision):
    """Time/class embeddings, conv_in, conv_out, shortcut convolutions (and MLPerf's
    up_blocks.2.resnets.2 convs, absent in the tiny UNet) take no dequantized input; the others do.
    INT8 keeps the downsampler convolutions too (the sweep's finding); FP8 quantizes them."""
    model = onnx.load(str(layout.onnx_path(quantized(precision), networks.UNET.name)))
    consumers = dequantized_consumers(model)
    layers = {node.name for node in model.graph.node if node.op_type in ("Conv", "MatMul", "Gemm")}
    keep = unet_keep(precision)
    for name in layers:
        if keep.match(name.replace("/", ".").lstrip(".").removeprefix("unet.")):
            assert name not in consumers, f"{name} is quantized but {precision} keeps it"
    downsamplers = {name for name in layers if "/downsamplers.0/conv/" in name}
    assert downsamplers and (downsamplers & consumers if precision == "fp8" else not downsamplers & consumers)
    for wanted in ("/unet/conv_in/Conv", "/unet/conv_out/Conv", "/unet/time_embedding/linear_1/Gemm"):
        assert any(name.startswith(wanted.rsplit("/", 1)[0]) for name in layers), wanted
        assert not any(name.startswith(wanted.rsplit("/", 1)[0] + "/") for name in consumers), wanted
    assert any("/attn1/to_q/" in name for name in consumers)
    assert any("/resnets.0/conv1/" in name for name in consumers)


def test_vae_decoder_int8_keeps_mlperf_exclusions_and_the_encoder_float(quantized):
    repository = quantized("int8")
    decoder = onnx.load(str(layout.onnx_path(repository, networks.VAE_DECODER.name)))
    consumers = dequantized_consumers(decoder)
    assert consumers, "no quantized layer in the VAE decoder"
    for name in consumers:
        assert not VAE_DECODER_KEEP.match(name.replace("/", ".").lstrip(".").removeprefix("vae.")), name
    info = json.loads((layout.version_dir(repository, networks.VAE_DECODER.name) / layout.EXPORT_INFO_FILE).read_text())
    assert info["precision"] == "int8" and "post_quant_conv" in info["quantization"]["kept_layers"]


@pytest.mark.parametrize("precision,dtype", [("int8", "fp32"), ("fp8", "fp32"), ("int8", "fp16"), ("fp8", "fp16")])
def test_onnx_runtime_runs_them_close_to_float(quantized, exported, loaded, precision, dtype):
    """Same inputs through the float and the 8-bit graph: the output is close (SNR), not equal."""
    repository = quantized(precision, dtype)
    dims = ModelDims.from_pipeline(loaded(dtype).pipe)
    for name in QUANTIZED_NETWORKS:
        if (name == networks.VAE_DECODER.name and precision != "int8") or not layout.onnx_path(repository, name).exists():
            continue
        spec = networks.NETWORKS[name]
        inputs = {k: v.numpy() for k, v in example_inputs(spec, dims, dtype.upper(), batch=2, latent_height=16,
                                                          latent_width=16, seed=3).items()}
        reference, value = run(exported(dtype), name, inputs), run(repository, name, inputs)
        assert np.isfinite(value).all()
        snr = snr_db(reference, value)
        assert MIN_SNR_DB[name] <= snr < 80, (name, snr)


def test_the_pipeline_given_stays_float(quantized, loaded):
    """Tests (and any caller) reuse one pipeline for many exports: the export quantizes copies."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantized("int8", "fp16")  # exported from the session's fp16 pipeline: its UNet and VAE quantized
    pipe = loaded("fp16").pipe
    for module in (pipe.unet, pipe.vae):
        assert not any(isinstance(m, TensorQuantizer) for m in module.modules())


def test_lora_sites_are_the_float_graphs(quantized, exported):
    from contract.loras import SITES_FILE

    name = networks.UNET_LORA.name
    assert (layout.version_dir(quantized("int8"), name) / SITES_FILE).read_text() == \
        (layout.version_dir(exported("fp32"), name) / SITES_FILE).read_text()


def test_default_prompts_file_states_its_source():
    text = DEFAULT_PROMPTS_FILE.read_text()
    assert "Source:" in text and "COCO" in text and "mlcommons/inference" in text
    prompts = read_prompts(DEFAULT_PROMPTS_FILE, 1000)
    assert len(prompts) == 64 and prompts[0] == "A city at night with people walking around."


def test_read_prompts_errors_name_the_flag_and_file(tmp_path):
    with pytest.raises(ExportError, match=r"--calibration-prompts .*missing.txt.*cannot read"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ExportError, match=r"empty.txt.*no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "two.txt").write_text("a cat\n\n# skipped\na dog\n")
    assert read_prompts(tmp_path / "two.txt") == ("a cat", "a dog")
    assert read_prompts(tmp_path / "two.txt", 1) == ("a cat",)
    with pytest.raises(ExportError, match=r"--calibration-count 0"):
        read_prompts(tmp_path / "two.txt", 0)


def test_check_precisions():
    assert check_precisions("fp16", None, None) == ("fp16", "fp16")
    assert check_precisions("fp32", "fp8", "int8") == ("fp8", "int8")
    assert check_precisions("fp16", "fp16", "fp16") == ("fp16", "fp16")
    with pytest.raises(ExportError, match=r"--unet-precision fp16 with --dtype fp32"):
        check_precisions("fp32", "fp16", None)
    with pytest.raises(ExportError, match=r"--vae-precision 'fp8': expected one of fp16, fp32, int8"):
        check_precisions("fp16", None, "fp8")


@pytest.mark.parametrize("argv,message", [
    (["--unet-precision", "fp32"], "--unet-precision fp32 with --dtype fp16"),
    (["--unet-precision", "int8", "--calibration-prompts", "/nonexistent/prompts.txt"], "--calibration-prompts '/nonexistent/prompts.txt'"),
    (["--unet-precision", "int8", "--calibration-count", "0"], "--calibration-count 0"),
    (["--unet-precision", "fp8", "--calibration-size", "100"], "--calibration-size 100"),
])
def test_cli_refuses_bad_flags_before_any_work(tiny_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "repo"
    assert export_main(["onnx", "--model", str(tiny_dir), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not layout.onnx_path(out, "unet").exists()


def test_cli_rejects_unknown_precisions(tiny_dir, tmp_path):
    with pytest.raises(SystemExit):
        export_main(["onnx", "--model", str(tiny_dir), "--out", str(tmp_path), "--unet-precision", "int4"])
    with pytest.raises(SystemExit):
        export_main(["onnx", "--model", str(tiny_dir), "--out", str(tmp_path), "--vae-precision", "fp8"])


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_rtx_builds_the_quantized_unet(quantized, tmp_path, precision):
    """TensorRT-RTX (the builder here; strongly typed) accepts both Q/DQ UNets with the production
    profile. Whether a GPU runs them in 8 bit is its compute capability's business (FP8: 8.9, 12.0)."""
    from contract.layout import TEMPLATES
    from export.engines import BuildSettings, build_engine, graph_dims

    repository = quantized(precision, "fp16")
    graph_dir = layout.version_dir(repository, networks.UNET.name)
    parsed, built = build_engine(graph_dir / layout.ONNX_FILE, networks.UNET, graph_dims(graph_dir),
                                 BuildSettings.from_repository(TEMPLATES), tmp_path)
    assert built and (tmp_path / layout.ENGINE_FILE).stat().st_size > 0
    assert list(parsed.inputs) == networks.UNET.input_names and parsed.inputs["sample"][0] == "HALF"
    assert parsed.strongly_typed


def test_vae_decoder_alone_is_calibrated_on_the_float_unets_latents(loaded, tiny_sources, tmp_path):
    """An export of the VAE decoder alone in int8 runs the recipe's float loop for its latents."""
    export_pipeline(loaded("fp32"), tmp_path, "fp32", names=(networks.VAE_DECODER.name,),
                    precisions=Precisions("fp32", "int8", calibration(tiny_sources, count=2)))
    info = json.loads((layout.version_dir(tmp_path, networks.VAE_DECODER.name) / layout.EXPORT_INFO_FILE).read_text())
    assert info["precision"] == "int8" and info["quantization"]["calibration"]["prompts"] == 2
    assert not layout.onnx_path(tmp_path, networks.UNET.name).exists()
