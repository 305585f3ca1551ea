"""Shared fixtures: one tiny SDXL pipeline per session, loaded and exported once per dtype; and the
session's last check: no process it started (servers, stubs, supervisors) is left running."""

from __future__ import annotations

import os
import time

# Engine tests build with TensorRT-RTX, which needs no GPU (full TensorRT is not installable here).
# Set before polygraphy is imported: it reads the variable once. Export 0 to test with TensorRT.
os.environ.setdefault("POLYGRAPHY_USE_TENSORRT_RTX", "1")

# Every process this session starts inherits this variable, however it is started: how the check
# at the session's end tells its leftovers from other servers on the machine.
SESSION_TAG = "SDXL_TRITON_TEST_SESSION"
os.environ[SESSION_TAG] = str(os.getpid())

import psutil  # noqa: E402
import pytest  # noqa: E402

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
def refined(loaded, exported, tiny_dir, tmp_path_factory):
    """`refined(dtype)`: (the tiny pipeline of `loaded(dtype)` with its refiner UNet as `pipe.refiner_unet`,
    a repository holding that refiner's graph alone), cached per dtype. The repositories of
    `exported` have none: their recipe has no refiner."""
    from dataclasses import replace

    import torch

    from contract.networks import REFINER_UNET_NAME, ModelDims
    from export.sources import load_refiner

    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            base = loaded(dtype)
            sources = replace(base.sources, refiner=str(tiny_dir / "refiner"))
            if getattr(base.pipe, "refiner_unet", None) is None:  # an attribute, not one of the pipeline's components
                refiner = load_refiner(sources.refiner, ModelDims.from_pipeline(base.pipe)).eval()
                base.pipe.refiner_unet = refiner.to({"fp16": torch.float16, "fp32": torch.float32}[dtype])
            stage = LoadedPipeline(base.pipe, sources, base.adapters)
            repository = tmp_path_factory.mktemp(f"refined_{dtype}")
            export_pipeline(stage, repository, dtype, names=(REFINER_UNET_NAME,))
            cache[dtype] = stage, repository
        return cache[dtype]

    return get


@pytest.fixture(scope="session")
def graphs(loaded, exported, refined):
    """`graphs(dtype, network)`: (the pipeline, a repository holding that network's graph)."""
    from contract.networks import REFINER_UNET_NAME

    def get(dtype: str, network: str):
        if network == REFINER_UNET_NAME:
            stage, repository = refined(dtype)
            return stage.pipe, repository
        return loaded(dtype).pipe, exported(dtype)

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


def _left_running() -> list[psutil.Process]:
    left = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get(SESSION_TAG) == str(os.getpid()):
                left.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


def pytest_sessionfinish(session, exitstatus):
    """After every fixture's teardown: a server, stub or supervisor this session started and did not
    stop fails the session, and is killed. Stubs exit within about 2 s of their server: wait 10 s."""
    deadline = time.monotonic() + 10
    while (left := _left_running()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not left:
        return
    described = []
    for process in left:
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            process.kill()
        except psutil.Error:
            pass
    writer = session.config.get_terminal_writer()
    writer.line()
    writer.line(
        f"error: {len(left)} processes started by this test session were still running at its end (now killed):\n  "
        + "\n  ".join(described), red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
