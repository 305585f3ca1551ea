"""Helpers shared by the tests: running graphs and modules, and the parity tolerances.

Tolerances are relative to the reference's largest magnitude, per export dtype:
- fp32: 1e-5. Both sides compute in fp32 (epsilon 1.2e-7); they differ only in kernel summation
  order, which measured 2e-6 at most on the tiny graphs.
- fp16: 1e-2, about ten fp16 ulps (epsilon 9.8e-4) of the output scale. PyTorch runs fp16 kernels
  while ONNX Runtime's CPU provider casts the ops it lacks fp16 kernels for to fp32, so each layer
  rounds differently; measured 2.5e-3 at most. The mean error must stay 10x tighter.
- uint8 pixels: at most 1 level apart (a value on a .5 rounding boundary), on few pixels: measured
  0.04% of pixels in fp32, 6.6% in fp16.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import onnxruntime as ort
import torch

from contract import layout

RELATIVE_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2}
PIXEL_MEAN_TOLERANCE = {"fp32": 0.005, "fp16": 0.15}


# What a server that tests only ensemble_sdxl loads with explicit model control: the ensemble (and so its
# steps), what its scheduler calls (unet; vae_encoder for img2img) and the LoRA listing (the client's --info);
# not the streaming endpoint's models, the ControlNets nor the other graphs (a large part of a start).
ENSEMBLE_ONLY = ["--model-control-mode=explicit",
                 *(f"--load-model={model}" for model in ("ensemble_sdxl", "unet", "vae_encoder", "loras"))]
# ... in engine mode, with LoRAs: the continuous-batching engine and the UNet graph with LoRA inputs too.
ENGINE_ONLY = [*ENSEMBLE_ONLY, "--load-model=denoiser", "--load-model=unet_lora"]


def graph_model(network: str) -> str:
    """The model of the tests' repositories that holds a network's graph (the controlnet network's:
    the tiny ControlNet's model, conftest.TINY_CONTROLNET; union_controlnet's: conftest.UNION_CONTROLNET's)."""
    from contract.networks import CONTROLNET_NAME, UNION_CONTROLNET_NAME, controlnet_model

    return {CONTROLNET_NAME: controlnet_model("tiny"), UNION_CONTROLNET_NAME: controlnet_model("union", union=True)}.get(network, network)


def ort_session(repository, network: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(layout.onnx_path(repository, graph_model(network))), providers=["CPUExecutionProvider"])


def run_torch(module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*inputs.values())
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def run_onnx(session, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return session.run(None, {name: t.numpy() for name, t in inputs.items()})


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype: str, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(np.abs(expected).max(), 1e-6)
    max_error = np.abs(actual - expected).max() / scale
    mean_error = np.abs(actual - expected).mean() / scale
    tolerance = RELATIVE_TOLERANCE[dtype]
    assert max_error <= tolerance, f"{what}: max error {max_error:.2e} of scale {scale:.3g} > {tolerance:.0e}"
    assert mean_error <= tolerance / 10, f"{what}: mean error {mean_error:.2e} > {tolerance / 10:.0e}"


def assert_pixels_close(actual: np.ndarray, expected: np.ndarray, dtype: str, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.uint8, what
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1, f"{what}: pixels differ by up to {difference.max()} levels"
    assert difference.mean() <= PIXEL_MEAN_TOLERANCE[dtype], f"{what}: mean pixel difference {difference.mean():.3f}"


def no_lora_feed(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feed` plus zero LoRA weights (rank 1) for a graph that takes them, sized from the graph."""
    batch = next(iter(feed.values())).shape[0]
    extra = {}
    for graph_input in session.get_inputs():
        if graph_input.name in ("lora_down", "lora_up") and graph_input.name not in feed:
            dtype = np.float16 if "float16" in graph_input.type else np.float32
            shape = [batch if i == 0 else (d if isinstance(d, int) else 1) for i, d in enumerate(graph_input.shape)]
            extra[graph_input.name] = np.zeros(shape, dtype)
    return {**feed, **extra}


def start_engine_server(source, tmp_path_factory, name: str, extra_args: tuple = ()):
    """A tritonserver serving a copy of the repository `source` (its LoRA library too, when it has
    one) with the scheduler in engine mode (parameter engine: denoiser): the continuous-batching engine.
    `extra_args`: tritonserver's (ENGINE_ONLY: the ensemble's models alone)."""
    import shutil

    from contract.configs import config_files, set_parameters
    from contract.loras import library_dir
    from serving.server import TritonServer, free_ports

    repository = tmp_path_factory.mktemp(f"{name}_repo")
    shutil.copytree(source, repository, dirs_exist_ok=True)
    if library_dir(source).is_dir():
        shutil.copytree(library_dir(source), library_dir(repository))
    for path in config_files(repository, "scheduler"):
        set_parameters(path, {"engine": "denoiser"})
    log = tmp_path_factory.mktemp(name) / "tritonserver.log"
    return TritonServer(repository, "cpu", *free_ports(3), log_file=log, extra_args=list(extra_args)).start()


def metric(server, name: str) -> float:
    """The sum over a Prometheus metric's labelled series on a running server's metrics port."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def stop_quickly(server) -> None:
    """Kill a test's server (and remove what its processes leave): a clean shutdown takes Triton 2.51
    about 1 s per model instance, serially (6 s for this repository's), and these tests do not look
    at it (the session's shared servers and test_supervisor.py's drain do)."""
    server.stop(kill=True)


@contextmanager
def running(server):
    """`server` started, and stopped quickly whatever happens."""
    server.start()
    try:
        yield server
    finally:
        stop_quickly(server)


QUANTIZED_NETWORKS = ("unet", "unet_lora", "vae_decoder")  # what an 8-bit export quantizes


def calibration(tiny_sources, count: int = 4):
    """The tiny recipe's calibration on `count` of the default prompts at 128x128."""
    from contract.recipes import custom_recipe
    from export.quantize import DEFAULT_PROMPTS_FILE, Calibration, read_prompts

    recipe = custom_recipe(tiny_sources.model, "lcm")
    return Calibration.for_recipe(recipe, read_prompts(DEFAULT_PROMPTS_FILE, count), size=128, source="test")
