"""Engines through the project's own polygraphy code, built with TensorRT-RTX (no GPU needed).

Engines cannot be deserialized without a GPU, so these tests check what the builder was given:
the parsed network's interface and each profile, against the production configs and the limits
the scheduler enforces.
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys

import onnx
import pytest
from helpers import graph_model

from contract import layout, networks
from export.cli import main
from export.engines import (ENGINE_FILE, FINGERPRINT_FILE, BuildSettings, EngineError, build_engine,
                            graph_dims, profile_shapes, using_tensorrt_rtx)
from contract.networks import SDXL_DIMS
from contract.configs import read_config, scheduler_limits
from contract.layout import TEMPLATES as REPO

TRT_TYPES = {"FP16": "HALF", "FP32": "FLOAT", "INT32": "INT32", "INT64": "INT64", "UINT8": "UINT8"}


# One build group in a process of its own: build_engines' results, pickled to the file it is given.
BUILD_GROUP = """
import pickle, sys
from export.engines import build_engines
source, out, settings, names, result = pickle.load(open(sys.argv[1], "rb"))
pickle.dump(build_engines(source, out, settings, names=names), open(result, "wb"))
"""


def build_in_parallel(groups: list, out, settings, work) -> dict:
    """build_engines for each (repository, names) group, two processes at a time: the builder runs on
    one core, and holds the GIL (threads gained nothing)."""
    results, running = {}, []
    for index, (source, names) in enumerate(groups):
        if len(running) == 2:
            results.update(finish(*running.pop(0)))
        job, result = work / f"group{index}.pickle", work / f"result{index}.pickle"
        job.write_bytes(pickle.dumps((source, out, settings, names, result)))
        running.append((subprocess.Popen([sys.executable, "-c", BUILD_GROUP, str(job)], cwd=layout.REPO_ROOT), result))
    for process, result in running:
        results.update(finish(process, result))
    return results


def finish(process, result) -> dict:
    assert process.wait(timeout=600) == 0, "an engine build group failed (its output is above)"
    return pickle.loads(result.read_bytes())


@pytest.fixture(scope="module")
def built(exported, refined, tmp_path_factory):
    """The tiny pipeline's fp16 graphs (its ControlNets' models controlnet_tiny and union_controlnet_union
    listed as their networks) and its refiner's, built with the default (production) settings, in three
    groups, two processes at a time."""
    out, work = tmp_path_factory.mktemp("engines"), tmp_path_factory.mktemp("engine-groups")
    settings = BuildSettings.from_repository(REPO)
    repository = exported("fp16")
    models = {graph_model(network): network for network in (networks.CONTROLNET.name, networks.UNION_CONTROLNET.name)}
    # Balanced by their build times here (unet_control, unet_ip and unet_lora about 24 s each, unet 7 s, the
    # refiner's 9 s after the second group, the others 3 s or less).
    first = (networks.UNET_CONTROL.name, networks.UNET_IP_NAME, graph_model(networks.UNION_CONTROLNET.name))
    same_graph = ("controlnet_canny",)  # conftest.CANNY_CONTROLNET: controlnet_tiny's graph again
    rest = tuple(name for name in layout.served_networks(repository) if name not in (*first, *same_graph))
    groups = [(repository, first), (repository, rest), (refined("fp16")[1], (networks.REFINER_UNET.name,))]
    results = build_in_parallel(groups, out, settings, work)
    return {models.get(name, name): parsed for name, parsed in results.items()}, out, settings


def test_tensorrt_rtx_is_in_use():
    assert using_tensorrt_rtx()


def test_default_settings_are_the_repositorys():
    settings, limits = BuildSettings.from_repository(REPO), scheduler_limits(REPO)
    assert (settings.min_size, settings.max_size, settings.max_images) == (limits.min_size, limits.max_size, limits.max_images)
    assert settings.opt_size == 1024
    for name in networks.NETWORKS:
        assert settings.batch_range(name)[2] == read_config(REPO, name).max_batch_size, name


def test_sdxl_profiles():
    """The production profiles, spelled out: what the endpoint accepts, in latent space for SDXL."""
    settings = BuildSettings.from_repository(REPO)
    unet = profile_shapes(networks.UNET, SDXL_DIMS, settings)
    assert unet["sample"] == ((1, 4, 64, 64), (1, 4, 128, 128), (8, 4, 192, 192))
    assert unet["timestep"] == ((1,), (1,), (8,))
    assert unet["encoder_hidden_states"] == ((1, 77, 2048), (1, 77, 2048), (8, 77, 2048))
    assert unet["text_embeds"] == ((1, 1280), (1, 1280), (8, 1280))
    assert unet["time_ids"] == ((1, 6), (1, 6), (8, 6))
    assert "lora_down" not in unet  # the plain UNet: batches without LoRAs
    unet_lora = profile_shapes(networks.UNET_LORA, SDXL_DIMS, settings)
    assert {name: unet_lora[name] for name in unet} == unet
    assert unet_lora["lora_down"] == ((1, 1, 1593892), (1, 16, 1593892), (8, 256, 1593892))
    assert unet_lora["lora_up"] == ((1, 1494404, 1), (1, 1494404, 16), (8, 1494404, 256))
    assert profile_shapes(networks.VAE_DECODER, SDXL_DIMS, settings)["latents"] == (
        (1, 4, 64, 64), (1, 4, 128, 128), (4, 4, 192, 192))
    assert profile_shapes(networks.TEXT_ENCODER, SDXL_DIMS, settings)["input_ids"] == ((1, 77), (1, 77), (8, 77))


@pytest.mark.parametrize("network", networks.NETWORKS)
def test_builder_was_given_the_spec_and_the_config(built, graphs, network):
    results, out, settings = built
    parsed, spec, config = results[network], networks.NETWORKS[network], read_config(REPO, network)
    dims = graph_dims(layout.version_dir(graphs("fp16", network)[1], graph_model(network)))
    assert parsed.strongly_typed
    for kind, tensors, declared in (("inputs", spec.inputs, config.input), ("outputs", spec.outputs, config.output)):
        interface = getattr(parsed, kind)
        assert list(interface) == [t.name for t in tensors] == [t.name for t in declared]
        for tensor in tensors:
            dtype, shape = interface[tensor.name]
            assert dtype == TRT_TYPES[tensor.resolved_dtype("FP16")], f"{network}.{tensor.name}"
            assert shape == tensor.static_dims(dims), f"{network}.{tensor.name}"
    limits = scheduler_limits(REPO)
    for tensor in spec.inputs:
        low, opt, high = parsed.profile[tensor.name]
        assert low[0] == 1 and high[0] == config.max_batch_size, tensor.name
        if "latent_height" in tensor.dims:
            axis = tensor.dims.index("latent_height")
            assert (low[axis], opt[axis], high[axis]) == (limits.min_size // 8, 1024 // 8, limits.max_size // 8)
            assert (low[axis + 1], high[axis + 1]) == (limits.min_size // 8, limits.max_size // 8)
    assert (out / graph_model(network) / "1" / ENGINE_FILE).stat().st_size > 100_000
    assert (out / graph_model(network) / "1" / FINGERPRINT_FILE).exists()


def vae_graph(exported, tmp_path):
    """A private copy of the tiny VAE decoder graph, to change and rebuild."""
    source = layout.version_dir(exported("fp16"), "vae_decoder")
    target = tmp_path / "onnx"
    shutil.copytree(source, target)
    return target / layout.ONNX_FILE, graph_dims(target)


def test_rebuilt_only_when_graph_or_settings_change(exported, tmp_path):
    graph, dims = vae_graph(exported, tmp_path)
    out, settings = tmp_path / "out", BuildSettings.from_repository(REPO)
    assert build_engine(graph, networks.VAE_DECODER, dims, settings, out)[1]
    mtime = (out / ENGINE_FILE).stat().st_mtime_ns
    assert build_engine(graph, networks.VAE_DECODER, dims, settings, out) == (None, False)
    assert (out / ENGINE_FILE).stat().st_mtime_ns == mtime

    smaller = BuildSettings.from_repository(REPO, opt_size=768)
    assert build_engine(graph, networks.VAE_DECODER, dims, smaller, out)[1]
    assert build_engine(graph, networks.VAE_DECODER, dims, smaller, out)[1] is False

    model = onnx.load(str(graph))
    onnx.helper.set_model_props(model, {"changed": "yes"})
    onnx.save(model, str(graph))
    assert build_engine(graph, networks.VAE_DECODER, dims, smaller, out)[1]


def test_graph_the_parser_rejects(exported, tmp_path):
    graph, dims = vae_graph(exported, tmp_path)
    model = onnx.load(str(graph))
    node = model.graph.node[len(model.graph.node) // 2]
    node.op_type, node.domain = "NoSuchOp", "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(model, str(graph))
    out = tmp_path / "out"
    out.mkdir()
    (out / ENGINE_FILE).write_bytes(b"an engine of the graph before")
    (out / FINGERPRINT_FILE).write_text("{}")
    with pytest.raises(EngineError, match=rf"^vae_decoder: TensorRT's ONNX parser rejected {graph}: .*NoSuchOp"):
        build_engine(graph, networks.VAE_DECODER, dims, BuildSettings.from_repository(REPO), out)
    assert not list(out.iterdir()), "a stale or half-written engine was left behind"


def test_profile_the_builder_refuses(exported, tmp_path):
    graph, dims = vae_graph(exported, tmp_path)
    refused = BuildSettings(min_size=1024, opt_size=512, max_size=512)  # min > opt: bypasses check() on purpose
    with pytest.raises(EngineError, match=r"^vae_decoder: the TensorRT-RTX builder refused the network or its profile"):
        build_engine(graph, networks.VAE_DECODER, dims, refused, tmp_path / "out")
    assert not (tmp_path / "out" / ENGINE_FILE).exists()


@pytest.mark.parametrize("args,message", [
    (["--opt-size", "1000"], "--opt-size 1000: expected a positive multiple of 64"),
    (["--min-size", "1024", "--opt-size", "768"], "expected min <= opt <= max"),
    (["--max-batch", "0"], "--max-batch 0: expected at least 1 image per request"),
])
def test_bad_settings(args, message, capsys, tmp_path):
    assert main(["engines", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_graph(tmp_path, capsys):
    assert main(["engines", "--onnx", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "text_encoder: no " in capsys.readouterr().err
