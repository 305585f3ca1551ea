"""Secure by default (docs/security.md), on the session's real tritonserver over HTTP and gRPC: every
admin API (shared memory, model repository, model config, statistics, trace, logging) refuses a
call without the admin key (HTTP 403, gRPC UNAVAILABLE) and answers it as before with the key;
inference, health and metadata need no key; the server listens on loopback; no log line holds the key.
The supervisor's side (a default `make serve`: its ports, its generated key, the drain's statistics)
is in test_supervisor.py."""

from __future__ import annotations

import json
import subprocess

import psutil
import pytest

from benchmarks import security as bench
from benchmarks.security import SPARE_MODEL
from contract import security
from contract.limits import Limits
from serving.server import TritonInstall, TritonServer, exposure_warning

REFUSED_HTTP = "This API is restricted, expecting header 'admin-key'"
REFUSED_GRPC = "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"


def http_call(server, method: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, str]:
    return bench.http_call(server.http_url, method, path, body, key)


def backend_region(server) -> str:
    region = bench.backend_region_key(server.process.pid)
    assert region.startswith("/triton_python_backend_shm_region_")
    return region


@pytest.fixture
def own_region():
    """A system shared-memory region of the test's own, for the registrations made with the key."""
    with bench.OwnRegion() as key:
        yield key


def test_http_admin_apis_refuse_without_the_key_and_answer_with_it(triton, own_region):
    refused = {name: http_call(triton, method, path, body)
               for name, method, path, body in bench.http_admin_calls(backend_region(triton))}
    assert {name: code for name, (code, _) in refused.items()} == {name: 403 for name in refused}
    assert all(REFUSED_HTTP in text for _, text in refused.values()), refused
    answered = {name: http_call(triton, method, path, body, key=triton.admin_key)
                for name, method, path, body in bench.http_admin_calls(own_region)}
    failed = {name: answer for name, answer in answered.items() if answer[0] != 200}
    # No GPU here: registering a CUDA region fails in Triton's CUDA code, past the key's check.
    assert list(failed) == ["CUDA shared-memory register"] and failed["CUDA shared-memory register"][0] != 403, failed
    assert json.loads(answered["model config"][1])["name"] == "unet"
    assert own_region in answered["system shared-memory status"][1]
    assert {"name": SPARE_MODEL, "version": "1", "state": "READY"}.items() <= next(
        m for m in json.loads(http_call(triton, "POST", "/v2/repository/index", key=triton.admin_key)[1])
        if m["name"] == SPARE_MODEL).items()


def test_grpc_admin_apis_refuse_without_the_key_and_answer_with_it(triton, own_region):
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(triton.grpc_url)
    try:
        refused = {name: bench.grpc_call(call, client, None) for name, call in bench.grpc_admin_calls(backend_region(triton))}
        assert refused == {name: f"StatusCode.UNAVAILABLE: {REFUSED_GRPC}" for name in refused}
        key = triton.admin_headers("grpc")
        answered = {name: bench.grpc_call(call, client, key) for name, call in bench.grpc_admin_calls(own_region)}
        failed = {name: outcome for name, outcome in answered.items() if outcome != "ok"}
        assert list(failed) == ["CUDA shared-memory register"] and "restricted" not in failed["CUDA shared-memory register"]
        assert client.is_model_ready(SPARE_MODEL)
    finally:
        client.close()


def test_a_wrong_key_is_refused(triton):
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    assert http_call(triton, "GET", "/v2/models/stats", key="not-the-key-of-this-server")[0] == 403
    client = grpc.InferenceServerClient(triton.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_inference_statistics(headers={security.GRPC_METADATA: "not-the-key-of-this-server"})
    finally:
        client.close()


def test_inference_health_and_metadata_need_no_key(triton):
    import tritonclient.grpc as grpc

    from client import generate

    for path in ("/v2/health/ready", "/v2/health/live", "/v2", "/v2/models/ensemble_sdxl", "/v2/models/ensemble_sdxl/ready"):
        assert http_call(triton, "GET", path)[0] == 200, path
    client = grpc.InferenceServerClient(triton.grpc_url)
    try:
        assert client.is_server_ready() and client.is_model_ready("ensemble_sdxl")
        assert client.get_model_metadata("ensemble_sdxl").name == "ensemble_sdxl"
        assert client.get_server_metadata().version
    finally:
        client.close()
    for protocol, url in (("http", triton.http_url), ("grpc", triton.grpc_url)):
        assert generate("a cat", url=url, protocol=protocol, height=128, width=128, seed=3).images.shape == (1, 128, 128, 3)


def test_the_server_listens_on_loopback_only(triton):
    """HTTP, gRPC and metrics; gRPC on 127.0.0.1 listens as ::ffff:127.0.0.1 (an IPv6 socket)."""
    listening = {c.laddr.port: c.laddr.ip for c in psutil.Process(triton.process.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert {triton.http_port, triton.grpc_port, triton.metrics_port} <= set(listening)
    assert set(listening.values()) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


def test_no_log_line_holds_the_key(triton):
    log = triton.log_file.read_text(errors="replace")
    assert triton.admin_key not in log


def test_the_command_line_and_what_is_logged_of_it():
    server = TritonServer(http_port=1, grpc_port=2, metrics_port=3, admin_key="k" * 32)
    install = TritonInstall(security.REPO_ROOT / "tritonserver", None, None)
    command = server.command(install)
    for option in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                   "--allow-sagemaker=false", "--allow-vertex-ai=false",
                   "--http-restricted-api=shared-memory,model-config,model-repository,statistics,trace,logging:admin-key=" + "k" * 32,
                   "--grpc-restricted-protocol=shared-memory,model-config,model-repository,statistics,trace,logging:admin-key=" + "k" * 32):
        assert option in command
    assert not any("k" * 32 in arg for arg in server.redacted_command(install))
    assert TritonServer().admin_key != TritonServer().admin_key  # one per server unless given


def test_http_max_input_size_is_passed_where_the_server_has_it(monkeypatch):
    import serving.server as server_module

    server = TritonServer(max_input_size=Limits().max_request_bytes)
    install = TritonInstall(security.REPO_ROOT / "tritonserver", None, None)
    monkeypatch.setattr(server_module, "_help_text", lambda _: "--http-max-input-size <integer>")
    assert f"--http-max-input-size={46 << 20}" in server.command(install)
    monkeypatch.setattr(server_module, "_help_text", lambda _: "--http-port <integer>")
    assert not any(arg.startswith("--http-max-input-size") for arg in server.command(install))
    assert not TritonInstall.bundled().supports("--http-max-input-size")  # 2.51: the option came in 25.06


def test_largest_legal_request_bound():
    """Four 1536² RGB images, an init image and its mask (36 MiB), prompts and names, a quarter more."""
    limits = Limits()
    pixels = 1536 * 1536
    assert 5 * pixels * 3 + pixels == 36 << 20
    assert limits.max_request_bytes == 46 << 20 and limits.max_request_bytes >= 1.25 * (36 << 20)


def test_exposure_warning_names_what_is_exposed():
    ports = {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}
    assert exposure_warning("127.0.0.1", ports) is None and exposure_warning("localhost", ports) is None
    text = exposure_warning("0.0.0.0", ports)
    assert text.startswith("warning: listening on 0.0.0.0") and "HTTP 8000" in text and "gRPC 8001" in text
    assert "metrics 8002" in text and "health 8003" in text and "admin key" in text


@pytest.mark.parametrize("key, accepted", [("a" * 16, True), ("a" * 15, False), ("has space" * 3, False),
                                           ("é" * 20, False), ("a" * 257, False), ("k:e=y,Z" * 4, True)])
def test_key_rules(key, accepted):
    if accepted:
        assert security.check_key(key, "test") == key
    else:
        with pytest.raises(security.AdminKeyError, match="expected 16 to 256 printable ASCII characters") as error:
            security.check_key(key, "SDXL_ADMIN_KEY")
        assert key not in str(error.value)


def test_key_files(tmp_path, monkeypatch):
    path = tmp_path / "key"
    security.write_key_file(path, "x" * 20)
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == "x" * 20 + "\n"
    assert security.read_key_file(path) == "x" * 20
    monkeypatch.delenv(security.KEY_ENV, raising=False)
    assert security.client_key(path, environ={}) == "x" * 20
    assert security.client_key(path, environ={security.KEY_ENV: "y" * 20}) == "y" * 20
    with pytest.raises(security.AdminKeyError, match="cannot read the admin key file"):
        security.read_key_file(tmp_path / "missing")


def test_make_serve_binds_loopback_unless_asked_and_perf_sends_the_key():
    def dry_run(*args: str) -> str:
        return subprocess.run(["make", "-n", *args], cwd=security.REPO_ROOT, capture_output=True, text=True, check=True).stdout

    assert "--host 127.0.0.1" in dry_run("serve")
    assert "--host 0.0.0.0" in dry_run("serve", "HOST=0.0.0.0")
    assert "--admin-key-file /run/key" in dry_run("serve", "ADMIN_KEY_FILE=/run/key")
    assert f'-H "{security.GRPC_METADATA}:$key"' in dry_run("perf", "PERF_ANALYZER=true")
