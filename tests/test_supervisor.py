"""The supervisor (`python -m serving.server`, what `make serve` and the container run) on a real
tritonserver: a killed model process is found, reported not ready and repaired by a restart; a
model's "not healthy" report does the same; SIGTERM under load drains without losing a request.
Detection and recovery times are measured by benchmarks/faults.py, not asserted here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from benchmarks import security as bench_security
from client import ClientError, generate
from contract import security
from serving.admission import RunState, run_directory
from serving.processes import stubs_of
from serving.supervisor import SupervisorProcess

REPO_ROOT = Path(__file__).resolve().parent.parent


def generate_on(server: SupervisorProcess, **options):
    return generate("a lighthouse", url=server.grpc_url, protocol="grpc", seed=1, timeout_s=60,
                    **{"height": 128, "width": 128, **options})


def outcome(call) -> str:
    try:
        call()
        return "ok"
    except ClientError as error:
        return f"{error.status}: {error}"


def test_health_endpoints_and_metrics(supervised):
    assert supervised.get("/v2/health/live")[0] == 200
    code, text = supervised.get("/metrics")
    assert code == 200 and "sdxl_supervisor_ready 1" in text
    assert supervised.get("/nowhere")[0] == 404
    assert generate_on(supervised).images.shape == (1, 128, 128, 3)


def test_a_default_server_listens_on_loopback_only(supervised):
    """Every port of a default `make serve` (HTTP, gRPC, metrics, the supervisor's health) on 127.0.0.1;
    gRPC's socket is an IPv6 one bound to ::ffff:127.0.0.1."""
    listening = bench_security.listening(supervised)
    assert {str(port) for port in supervised.ports.values()} <= set(listening)
    assert set(listening.values()) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    assert "warning: listening on" not in supervised.log_tail(10**6)


def test_the_generated_key_guards_the_admin_apis(supervised):
    """No key given: one generated for this start, in a file only its owner reads, that the local tools
    use (the client's --info here); without it the admin APIs refuse."""
    from client import info

    assert supervised.key_file.stat().st_mode & 0o777 == 0o600
    assert bench_security.http_call(supervised.http_url, "GET", "/v2/models/stats")[0] == 403
    assert bench_security.http_call(supervised.http_url, "GET", "/v2/models/stats", key=supervised.admin_key)[0] == 200
    assert info(supervised.grpc_url, "grpc", admin_key_file=supervised.key_file)["recipe"]
    with pytest.raises(ClientError, match="the key sent was not accepted"):
        info(supervised.http_url, "http", admin_key="a-key-of-another-server")
    assert f"admin key: generated for this start, in {supervised.key_file} (mode 600)" in supervised.log_tail(10**6)


def test_requests_that_crash_tritonserver_are_answered_by_a_restart(supervised):
    """tritonserver 2.51 dies of an HTTP request in 6-byte chunks (SIGSEGV) and of a JSON input whose
    shape claims 2^62 bytes (SIGABRT); the supervisor serves again (times: make bench-security)."""
    for name, attack in bench_security.CRASHES.items():
        result = bench_security.crash_and_recover(supervised, attack)
        assert result["server_died"] and result["request_after"].startswith("ok"), (name, result)
    assert 'sdxl_supervisor_restarts_total{reason="server_exited"} 2' in supervised.get("/metrics")[1]


def test_killed_stub_is_found_reported_and_repaired(supervised):
    server_pid = supervised.server_pid()
    victim = next(stub for stub in stubs_of(server_pid) if stub.model == "scheduler")
    os.kill(victim.pid, signal.SIGKILL)  # as the OOM killer would
    supervised.wait(ready=False, timeout_s=10)
    with ThreadPoolExecutor(4) as pool:  # requests meanwhile end, one way or the other: none hangs
        during = list(pool.map(lambda _: outcome(lambda: generate_on(supervised)), range(4)))
    # ok (a healthy instance), refused (restarting), or no server on the port while it restarts
    expected = ("UNAVAILABLE", "not healthy", "failed to connect")
    assert all(o == "ok" or any(e in o for e in expected) for o in during), during
    supervised.wait(ready=True, timeout_s=120)
    assert supervised.server_pid() != server_pid and not psutil.pid_exists(victim.pid)
    assert [outcome(lambda: generate_on(supervised)) for _ in range(8)] == ["ok"] * 8  # full service: every instance answers
    metrics = supervised.get("/metrics")[1]
    assert 'sdxl_supervisor_restarts_total{reason="stub_zombie"} 1' in metrics
    assert 'sdxl_supervisor_stub_failures_total{model="scheduler",problem="zombie"} 1' in metrics


def test_not_healthy_report_restarts(supervised, exported, loaded, tmp_path, monkeypatch):
    """What a model reports when Triton answers its BLS call with "Stub process ... is not healthy".
    The restart keeps the LoRA library: a LoRA served before it is served the same after it."""
    from contract.configs import CPU_DTYPE
    from export import lora as library
    from export.tiny import write_style_lora

    monkeypatch.setenv("SDXL_LORA_LIBRARY", str(supervised.lora_library))
    library.add(exported(CPU_DTYPE), "ink", str(write_style_lora(loaded(CPU_DTYPE).pipe, tmp_path / "ink", seed=41)), 64)
    before = generate_on(supervised, loras=[("ink", 0.8)]).images
    server_pid = supervised.server_pid()
    RunState(run_directory(server_pid)).report_unhealthy("unet: Stub process 'unet_0_0' is not healthy.")
    supervised.wait(ready=False, timeout_s=10)
    supervised.wait(ready=True, timeout_s=120)
    assert supervised.server_pid() != server_pid
    assert 'sdxl_supervisor_restarts_total{reason="stub_not_healthy"} 1' in supervised.get("/metrics")[1]
    assert generate_on(supervised).images.shape == (1, 128, 128, 3)
    assert (generate_on(supervised, loras=[("ink", 0.8)]).images == before).all()


def test_a_stream_whose_denoiser_dies_ends_with_the_restart(supervised):
    """On 2.51 a BLS caller waiting on a dead decoupled callee waits forever; the supervisor's restart
    (its drain of restart_drain_s, 5 s, then the process group killed) ends the stream with an error."""
    server_pid = supervised.server_pid()
    updates = generate("a dog", url=supervised.grpc_url, protocol="grpc", seed=1, stream=True, timeout_s=120,
                       num_inference_steps=8, height=1024, width=1024)
    assert next(updates).step == 1
    os.kill(next(stub for stub in stubs_of(server_pid) if stub.model == "denoiser").pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(ClientError):
        list(updates)
    print(f"stream ended {time.monotonic() - killed:.1f} s after the denoiser was killed")
    assert time.monotonic() - killed < 60  # the client's own deadline (120 s) did not end it
    supervised.wait(ready=True, timeout_s=120)
    assert supervised.server_pid() != server_pid
    assert [u.step for u in stream_on(supervised, num_inference_steps=2)] == [1, 2]


def stream_on(server: SupervisorProcess, **options) -> list:
    return list(generate("a lighthouse", url=server.grpc_url, protocol="grpc", seed=1, timeout_s=60, stream=True,
                         preview_every=2, **{"height": 128, "width": 128, **options}))


def test_sigterm_drains_under_load_without_losing_a_request(supervised):
    """6 ensemble requests and 2 streams in flight (the admitted capacity, 8): every one finishes."""
    server_pid = supervised.server_pid()
    run = run_directory(server_pid)
    slow = dict(height=256, width=256, num_inference_steps=8)
    with ThreadPoolExecutor(8) as pool:
        in_flight = [pool.submit(generate_on, supervised, **slow) for _ in range(6)]
        streams = [pool.submit(stream_on, supervised, **slow) for _ in range(2)]
        time.sleep(0.5)
        supervised.process.send_signal(signal.SIGTERM)
        supervised.wait(ready=False, timeout_s=5)
        refused = outcome(lambda: generate_on(supervised))
        images = [future.result().images for future in in_flight]  # raises if any was lost
        streamed = [future.result() for future in streams]
    assert all(image.shape == (1, 256, 256, 3) for image in images)
    for updates in streamed:
        assert [u.step for u in updates] == list(range(1, 9)) and updates[-1].images.shape == (1, 256, 256, 3)
    assert "UNAVAILABLE" in refused and "server is draining (shutting down)" in refused, refused
    assert supervised.process.wait(timeout=120) == 0
    for pid in (server_pid, *(stub.pid for stub in stubs_of(server_pid))):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(ProcessLookupError):
        os.killpg(server_pid, 0)  # the whole process group ended
    assert not run.exists()
    # The start's generated key goes with it; no log line of the supervisor, tritonserver or a model held it.
    assert not supervised.key_file.exists()
    assert supervised.admin_key not in supervised.log_path.read_text(errors="replace")


def test_a_signal_inside_the_first_signals_handler_does_not_hang(monkeypatch):
    """`kill -TERM -- -PGID` of `make serve` signals make and the supervisor at once, and make passes its
    own on: the second handler can run inside the first (Python runs handlers between bytecodes). With
    threading.Event the nested set() waited for the lock its own thread held and the supervisor hung for
    good (seen here); SignalFlag takes no lock. The nested signal is simulated where it struck."""
    import threading

    from serving.supervisor import SignalFlag, Supervisor

    supervisor = Supervisor(server=None)
    original, nested = SignalFlag.set, []

    def set_with_a_signal_inside(flag):
        original(flag)
        if not nested:
            nested.append(True)
            supervisor._on_signal(signal.SIGTERM, None)  # the second SIGTERM, inside the first set()

    monkeypatch.setattr(SignalFlag, "set", set_with_a_signal_inside)
    handler = threading.Thread(target=supervisor._on_signal, args=(signal.SIGTERM, None), daemon=True)
    handler.start()
    handler.join(timeout=5)
    assert not handler.is_alive() and supervisor._stop.is_set() and supervisor._hurry.is_set()


def test_a_second_sigterm_stops_waiting_for_requests(exported, tmp_path):
    """Two SIGTERMs: the first drains, the second ends the wait for requests; the supervisor exits 0."""
    from contract.configs import CPU_DTYPE

    server = SupervisorProcess(exported(CPU_DTYPE), tmp_path / "serve.log")
    try:
        server.wait(ready=True, timeout_s=300)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(outcome, lambda: generate_on(server, height=256, width=256, num_inference_steps=8))
            time.sleep(1.0)
            os.kill(server.process.pid, signal.SIGTERM)
            time.sleep(0.2)
            os.kill(server.process.pid, signal.SIGTERM)
            assert server.process.wait(timeout=60) == 0
            running.result(timeout=60)  # ended one way or the other: not waited for
        assert "a second SIGTERM/SIGINT: not waiting for requests any longer" in server.log_tail(10**6)
    finally:
        server.kill_everything()


def test_a_busy_health_port_is_one_error_line(exported):
    import socket

    from contract.configs import CPU_DTYPE

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "serving.server", "--repository", str(exported(CPU_DTYPE)),
                                 "--variant", "cpu", "--health-port", str(port)], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=120, env={**os.environ, security.KEY_ENV: security.generate_key()})
    assert result.returncode == 2
    assert f"[supervisor] error: cannot serve health on port {port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_supervisor_takes_its_server_and_stubs_with_it(exported, tmp_path):
    """kill -9 of `python -m serving.server` (the OOM killer, a careless operator): its tritonserver
    gets SIGKILL from the kernel (PR_SET_PDEATHSIG) and the stubs exit with it, so nothing is left
    serving unsupervised on the ports."""
    from contract.configs import CPU_DTYPE

    server = SupervisorProcess(exported(CPU_DTYPE), tmp_path / "serve.log")
    try:
        server.wait(ready=True, timeout_s=300)
        server_pid = server.server_pid()
        pids = [server_pid, *(stub.pid for stub in stubs_of(server_pid))]
        assert len(pids) > 1
        server.process.kill()
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(gone(pid) for pid in pids):
            time.sleep(0.1)
        left = [pid for pid in pids if not gone(pid)]
        assert not left, f"still running after the supervisor's SIGKILL: {left}"
    finally:
        server.kill_everything()
