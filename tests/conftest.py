"""Shared fixtures: one tiny SDXL pipeline per session, loaded and exported once per dtype."""

from __future__ import annotations

import os

# Engine tests build with TensorRT-RTX, which needs no GPU (full TensorRT is not installable here).
# Set before polygraphy is imported: it reads the variable once. Export 0 to test with TensorRT.
os.environ.setdefault("POLYGRAPHY_USE_TENSORRT_RTX", "1")

import pytest

from export.onnx_export import export_pipeline
from export.sources import LoadedPipeline, LoraSpec, Sources, load_pipeline
from export.tiny import write_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_sources(tiny_dir) -> Sources:
    """The tiny stand-in for the production set: base + LCM-LoRA stand-in + fp16-fix VAE stand-in."""
    return Sources(str(tiny_dir), (LoraSpec(str(tiny_dir / "lora")),), str(tiny_dir / "alt_vae"))


@pytest.fixture(scope="session")
def loaded(tiny_sources):
    """`loaded(dtype)`: the tiny pipeline with its LoRA fused, cached per dtype."""
    cache: dict[str, LoadedPipeline] = {}

    def get(dtype: str) -> LoadedPipeline:
        if dtype not in cache:
            cache[dtype] = load_pipeline(tiny_sources, dtype)
        return cache[dtype]

    return get


@pytest.fixture(scope="session")
def exported(loaded, tmp_path_factory):
    """`exported(dtype)`: a model repository holding the tiny pipeline's graphs, cached per dtype."""
    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            repository = tmp_path_factory.mktemp(f"repo_{dtype}")
            export_pipeline(loaded(dtype), repository, dtype)
            cache[dtype] = repository
        return cache[dtype]

    return get


@pytest.fixture(scope="session")
def serve(exported, tmp_path_factory):
    """`serve(dtype)`: a real tritonserver (CPU variant) on free ports serving the tiny pipeline's
    graphs of that dtype with this repository's configs (which the export set to that dtype) and
    models; explicit model control, so a test can unload a model. One server per dtype, kept."""
    from serving.server import TritonServer, free_port

    servers = {}

    def get(dtype: str) -> TritonServer:
        if dtype not in servers:
            log = tmp_path_factory.mktemp(f"triton_{dtype}") / "tritonserver.log"
            server = TritonServer(exported(dtype), "cpu", free_port(), free_port(), free_port(), log_file=log,
                                  extra_args=["--model-control-mode=explicit", "--load-model=*"])
            servers[dtype] = server.start()
        return servers[dtype]

    yield get
    for server in servers.values():
        server.stop()
        try:  # the whole process group (server and Python-backend stubs) is gone
            os.killpg(server.process.pid, 0)
            raise AssertionError(f"processes of tritonserver's group {server.process.pid} outlived stop()")
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def triton(serve):
    """The server of the CPU default dtype (contract.configs.CPU_DTYPE: the faster one on a CPU)."""
    from contract.configs import CPU_DTYPE

    return serve(CPU_DTYPE)
