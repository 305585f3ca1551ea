"""Shared fixtures: one tiny SDXL pipeline per session, loaded and exported once per dtype; and the
session's last check: no process it started (servers, stubs, supervisors) is left running."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
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


# The tiny ControlNets' names in the tests' repositories, as make demo's: tiny (models controlnet_tiny) and
# canny, the same ControlNet declaring the canny preprocessor; union, the tiny ControlNet-Union
# (union_controlnet_union), its modes union/depth, union/canny...
TINY_CONTROLNET, CANNY_CONTROLNET, UNION_CONTROLNET = "tiny", "canny", "union"


@pytest.fixture(scope="session")
def exported(loaded, tiny_dir, tmp_path_factory):
    """`exported(dtype)`: a model repository holding the tiny pipeline's graphs and its ControlNets' (as
    `make export-tiny` exports them: tiny, canny with the canny preprocessor, union; the depth estimator; and
    the plain IP-Adapter), cached per dtype. The pipeline of `loaded(dtype)` gets the ControlNet as
    `pipe.controlnet`, the union as `pipe.union_controlnet` (both in `pipe.controlnets`), the depth estimator as
    `pipe.depth_estimator` and `pipe.depth_processor`, the IP-Adapter as `pipe.ip_adapter` and its encoder as
    `pipe.image_encoder`."""
    from dataclasses import replace

    import torch

    from contract.controlnets import ControlNetSource
    from contract.networks import ModelDims
    from export.depth import DEPTH_SUBFOLDER, load_depth_estimator
    from export.ip_adapter import IMAGE_ENCODER_SUBFOLDER, IP_ADAPTER_SUBFOLDER, PLAIN_FILE, load_image_encoder, load_ip_adapter
    from export.sources import load_controlnet
    from export.tiny import UNION_SUBFOLDER

    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            base = loaded(dtype)
            path, union_path = str(tiny_dir / "controlnet"), str(tiny_dir / UNION_SUBFOLDER)
            if getattr(base.pipe, "controlnet", None) is None:  # attributes, not the pipeline's components
                torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
                dims = ModelDims.from_pipeline(base.pipe)
                base.pipe.controlnet = load_controlnet(path, dims).eval().to(torch_dtype)
                base.pipe.union_controlnet = load_controlnet(union_path, dims).eval().to(torch_dtype)
                base.pipe.controlnets = {TINY_CONTROLNET: base.pipe.controlnet, CANNY_CONTROLNET: base.pipe.controlnet,
                                         UNION_CONTROLNET: base.pipe.union_controlnet}
                depth_estimator, base.pipe.depth_processor = load_depth_estimator(str(tiny_dir / DEPTH_SUBFOLDER))
                base.pipe.depth_estimator = depth_estimator.to(torch_dtype)
                adapter = load_ip_adapter(str(tiny_dir / IP_ADAPTER_SUBFOLDER / PLAIN_FILE), base.pipe.unet)
                base.pipe.image_encoder = load_image_encoder(str(tiny_dir / IMAGE_ENCODER_SUBFOLDER), adapter).to(torch_dtype)
                base.pipe.ip_adapter = adapter.to(torch_dtype)
            controlnets = (ControlNetSource(TINY_CONTROLNET, path), ControlNetSource(CANNY_CONTROLNET, path, "canny"),
                           ControlNetSource(UNION_CONTROLNET, union_path))
            sources = replace(base.sources, controlnets=controlnets, depth_estimator=str(tiny_dir / DEPTH_SUBFOLDER),
                              ip_adapter=str(tiny_dir / IP_ADAPTER_SUBFOLDER / PLAIN_FILE),
                              image_encoder=str(tiny_dir / IMAGE_ENCODER_SUBFOLDER))
            stage = LoadedPipeline(base.pipe, sources, base.adapters)
            repository = tmp_path_factory.mktemp(f"repo_{dtype}")
            export_pipeline(stage, repository, dtype)
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
    """`graphs(dtype, network)`: (the pipeline, a repository holding that network's graph; the
    controlnet network's as model controlnet_tiny)."""
    from contract.networks import REFINER_UNET_NAME

    def get(dtype: str, network: str):
        if network == REFINER_UNET_NAME:
            stage, repository = refined(dtype)
            return stage.pipe, repository
        repository = exported(dtype)  # first: it gives the pipeline its ControlNet
        return loaded(dtype).pipe, repository

    return get


@pytest.fixture(scope="session")
def quantized(loaded, tiny_dir, tiny_sources, tmp_path_factory):
    """`quantized(precision, dtype)`: a repository with the UNet graph in `precision` (and the VAE
    decoder in int8 with an int8 UNet), calibrated on 4 prompts at 128x128. int8 in fp32 is the CLI's
    whole export (`python -m export onnx ... --unet-precision int8 --vae-precision int8`: unet_lora
    quantized as unet is, the other networks float), which test_quantization_served.py serves; the
    others are export_pipeline's of the session's pipeline, with the UNet and VAE decoder alone.
    Cached per (precision, dtype): test_quantization.py and test_quantization_served.py share them."""
    from export.cli import main as export_main
    from export.quantize import Precisions
    from helpers import calibration

    cache = {}

    def get(precision: str, dtype: str = "fp32"):
        if (precision, dtype) not in cache:
            repository = tmp_path_factory.mktemp(f"quantized_{precision}_{dtype}")
            if (precision, dtype) == ("int8", "fp32"):
                assert export_main([
                    "onnx", "--model", str(tiny_dir), "--lora", str(tiny_dir / "lora"), "--vae", str(tiny_dir / "alt_vae"),
                    "--preview-vae", str(tiny_dir / "preview_vae"), "--safety-checker", str(tiny_dir / "safety_checker"),
                    "--dtype", dtype, "--out", str(repository), "--unet-precision", "int8", "--vae-precision", "int8",
                    "--calibration-count", "4", "--calibration-size", "128"]) == 0
            else:
                vae = "int8" if precision == "int8" else dtype
                export_pipeline(loaded(dtype), repository, dtype, names=("unet", "vae_decoder"),
                                precisions=Precisions(precision, vae, calibration(tiny_sources)))
            cache[precision, dtype] = repository
        return cache[precision, dtype]

    return get


@pytest.fixture(scope="session")
def serve(exported, tmp_path_factory):
    """`serve(dtype)`: a real tritonserver (CPU variant) on free ports serving the tiny pipeline's
    graphs of that dtype with this repository's configs (which the export set to that dtype) and
    models; explicit model control, so a test can unload a model. One server per dtype, kept: the CPU
    default dtype's with every model (`triton`), another's with ensemble_sdxl's alone (its parity tests)."""
    from contract.configs import CPU_DTYPE
    from helpers import ENSEMBLE_ONLY
    from serving.server import TritonServer, free_ports

    servers = {}

    def get(dtype: str) -> TritonServer:
        if dtype not in servers:
            log = tmp_path_factory.mktemp(f"triton_{dtype}") / "tritonserver.log"
            models = ["--model-control-mode=explicit", "--load-model=*"] if dtype == CPU_DTYPE else ENSEMBLE_ONLY
            # The default dtype's traces requests (at Triton's default rate, each trace written as it ends): test_tracing
            # raises the rate for a while.
            traces = {"trace_file": log.parent / "traces" / "trace.json", "trace_log_frequency": 1} if dtype == CPU_DTYPE else {}
            server = TritonServer(exported(dtype), "cpu", *free_ports(3), log_file=log, extra_args=models, **traces)
            servers[dtype] = server.start()
        return servers[dtype]

    yield get
    for dtype, server in servers.items():
        if dtype != CPU_DTYPE:  # killed: a clean shutdown takes 2.51 about 1 s per model instance, one after another
            server.stop(kill=True)
            continue
        server.stop()  # Triton's own shutdown (what stop() does), checked once here
        try:  # the whole process group (server and Python-backend stubs) is gone
            os.killpg(server.process.pid, 0)
            raise AssertionError(f"processes of tritonserver's group {server.process.pid} outlived stop()")
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def engine_server(exported, tmp_path_factory):
    """The CPU default dtype's repository with the scheduler in engine mode (the continuous-batching
    engine: helpers.start_engine_server), one for the session's modules that only send it requests."""
    from contract.configs import CPU_DTYPE
    from helpers import start_engine_server, stop_quickly

    server = start_engine_server(exported(CPU_DTYPE), tmp_path_factory, "engine_server")
    yield server
    stop_quickly(server)


@pytest.fixture(scope="session")
def supervised(exported, tmp_path_factory):
    """The supervisor (`python -m serving.server`) as a default `make serve` runs it: loopback, and no
    key given, so it generates one (written where --generated-admin-key-file says: here, not the
    clone's build/); its LoRA library is SDXL_LORA_LIBRARY, as the chart sets it (empty at first).
    One for the session: test_deploy.py only sends it requests; test_supervisor.py restarts it and,
    last, drains it away (its SIGTERM test)."""
    from contract import security
    from contract.configs import CPU_DTYPE
    from serving.supervisor import SupervisorProcess

    work = tmp_path_factory.mktemp("supervisor")
    library = work / "loras" / "library"
    server = SupervisorProcess(exported(CPU_DTYPE), work / "serve.log",
                               extra_args=("--drain-timeout-s=60", f"--generated-admin-key-file={work / 'admin-key'}"),
                               env={"SDXL_LORA_LIBRARY": str(library), security.KEY_ENV: ""})
    server.lora_library, server.key_file = library, work / "admin-key"
    server.wait(ready=True, timeout_s=300)
    server.admin_key = security.read_key_file(server.key_file)
    yield server
    if server.process.poll() is None:  # not drained by test_supervisor.py: as a pod's stop would
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    server.kill_everything()


@pytest.fixture(scope="session")
def triton(serve):
    """The server of the CPU default dtype (contract.configs.CPU_DTYPE: the faster one on a CPU)."""
    from contract.configs import CPU_DTYPE

    return serve(CPU_DTYPE)


class ServerStarts:
    """Counts the tritonserver processes this session starts, however they are started (a TritonServer
    here, a supervisor's start or restart in a child process): a thread polls the process table every
    0.1 s for tritonserver processes carrying SESSION_TAG (a start lasts seconds; none is missed)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self._others: set[int] = set()  # tritonservers of other sessions on the machine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="server-starts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return len(self.seen)

    def _poll(self) -> None:
        session = str(os.getpid())
        while not self._stop.wait(0.1):
            for process in psutil.process_iter(["name"]):
                if process.info["name"] != "tritonserver" or process.pid in self.seen or process.pid in self._others:
                    continue
                try:
                    if "--help" in process.cmdline():  # serving.server asking it which options it has
                        continue
                    ours = process.environ().get(SESSION_TAG) == session
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                (self.seen if ours else self._others).add(process.pid)


SERVER_STARTS = ServerStarts()


def pytest_sessionstart(session):
    SERVER_STARTS.start()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The line a maintainer reads to keep the suite fast, after pytest's slowest durations."""
    starts = SERVER_STARTS.stop()
    terminalreporter.write_line(f"tritonserver starts in this session: {starts} (each a few seconds: share a started "
                                "server where a test only sends requests; tests/conftest.py)")


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
