"""Real-time painting (img2img, Krea-style): a client sends a painting session's frames, a 512x512
canvas that each frame adds a short brush stroke to, one after another over gRPC, and we measure the
frames per second, the latency per frame, and where one frame's time goes: the networks, the Python
models, and everything outside them (transfer, serialization, encode, decode, the ensemble).

    python -m benchmarks.painting [--frames 60] [--warmup 3] [--size 512] [--generate-frames 10] [--out build/results/painting_cpu]

Results: OUT.json and OUT.md, by default under $BENCH_RESULTS, else build/results/ (ignored by git);
BENCH_RESULTS=benchmarks/results (or --out benchmarks/results/painting_cpu) refreshes the committed ones.

The tiny pipeline, CPU variant, fp32, a real tritonserver with the repository's configs (as
benchmarks/streaming.py sets it up). Per configuration, `--warmup` frames, then `--frames` measured
frames, each sent when the previous answer has arrived (a closed loop of one), over one gRPC
connection kept open (as a painting app keeps it), same prompt and seed every frame (the app keeps the
seed so the picture stays stable), guidance 1.0 (no CFG), one image:
- img2img, num_inference_steps 2, strength 0.5: int(2 x 0.5) = 1 UNet step;
- img2img, num_inference_steps 4, strength 0.5: 2 UNet steps;
- text-to-image 512², 1 step, for comparison (no image sent, no VAE encode).
Client side, per frame: building the request's InferInputs (`client.build_inputs` +
`client.image_inputs`: numpy to bytes), the `infer` call (tritonclient's protobuf request, the gRPC
round trip, the server), and decoding the answer (`result.as_numpy`), each timed with perf_counter;
a frame's latency is their sum, frames per second the measured frames over the sequence's wall time.
Server side, Triton's statistics (gRPC get_inference_statistics) before and after the measured frames,
per frame: the networks' compute (text_encoder, unet, vae_encoder, vae_decoder: compute_input +
compute_infer; compute_output is recorded apart, since the Python backend runs it after the response
has gone: ON_PATH below), the Python models' (tokenizer, and the scheduler's compute less the time its
BLS calls to unet and vae_encoder spent in those models), the ensemble's request time; the rest of the
client's frame is "outside". Also `client.generate()` over `--generate-frames` further frames (it
opens a gRPC channel per call). And an H100/H200 estimate from published TensorRT figures scaled to
the size, plus the measured time outside the networks (an estimate, with its basis, in OUT.md).

Sessions (serving/sessions.py; `--session-frames`, 0: none): for each img2img configuration, first `--frames`
frames of one session on one `sdxl_stream` stream sent closed-loop (each when the previous one's answer came), with
where a frame's time goes (the networks, and outside them); then the frames of
one session on one gRPC stream (`client.generate_session`), sent open-loop at half, equal and twice the
frame rate the session's closed loop measured (the server's rate for a session's frames), with the prompt
unchanged (prompt cache hits) and changing every frame (misses): frames per second answered with an image,
latency median and p95 of those (from each frame's sending), skipped frames, the prompt cache's hits and
misses, and p95 over the frame time (1 / the server's rate). Last, on a second tritonserver that traces every
request (`TritonServer(trace_file=...)`), a session's frames closed-loop again, each frame's time split by its trace
(TRACE_SEGMENTS below: the stream's Python, the hand-offs, the denoiser's Python, the engine, gRPC). About 6 minutes on
2 cores with the defaults (the export included).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .measure import bench_parser, save_run, started_server
from .throughput import log, prepare_repository, tiny_pipeline

PROMPT = "an oil painting of a harbour at sunset, thick brush strokes"
SEED = 1234
STRENGTH = 0.5
# (name, num_inference_steps, strength or None for text-to-image)
CONFIGS = (("img2img, 1 UNet step", 2, STRENGTH), ("img2img, 2 UNet steps", 4, STRENGTH), ("text-to-image, 1 step", 1, None))
NETWORKS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
PYTHON_MODELS = ("tokenizer", "scheduler")
BLS_CALLEES = ("unet", "vae_encoder")  # what the scheduler calls (BLS) while its own compute runs

# Published figures (../shared/DESIGN.md, "Reference figures"): NVIDIA/Stability TensorRT SDXL + LCM,
# 1024², batch 1, H100 (Hugging Face card stabilityai/stable-diffusion-xl-1.0-tensorrt).
H100_1024 = {"text_encoders_ms": 0.78, "unet_step_ms": 102.8 / 4, "vae_decode_tf32_ms": 127.0}
H100_TURBO_512_4_STEPS_MS = 83.8  # SDXL-Turbo 512², 4 steps, H100, TensorRT, total
A100_TURBO_512 = {"unet_pass_ms": 67.0, "total_ms": 207.0}  # SDXL-Turbo 512², A100 (Stability)
VAE_ENCODER_RATIO = (0.4, 0.5)  # of the decoder's time at equal size: an estimate (34 M against 49 M parameters)
FP16_VAE_SPEEDUP = 2.0  # the repository serves the fp16-fix VAE in fp16 (docs/benchmarks.md): about half the TF32 time


class Canvas:
    """A deterministic RGB canvas (a sky, a sea, a horizon) and a painter adding one short stroke
    per frame: a dab of a few pixels' radius dragged a few pixels on from where the last one ended."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.rng = size, np.random.default_rng(seed)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        sky = y < 0.55
        image = np.zeros((size, size, 3), dtype=np.float32)
        image[..., 0] = np.where(sky, 250 - 120 * y, 30 + 40 * x)
        image[..., 1] = np.where(sky, 150 + 60 * y, 60 + 50 * y)
        image[..., 2] = np.where(sky, 90 + 100 * y, 110 + 60 * (1 - x))
        image[np.abs(y - 0.55) < 1.5 / size] = 40
        self.pixels = np.clip(image, 0, 255).astype(np.uint8)
        self.pen = np.array([size * 0.3, size * 0.6])
        self.yy, self.xx = np.mgrid[0:size, 0:size]

    def stroke(self) -> int:
        """Adds a stroke; returns how many pixels it changed."""
        before = self.pixels.copy()
        color = self.rng.integers(0, 256, 3, dtype=np.uint8)
        angle = self.rng.uniform(0, 2 * np.pi)
        length, radius = self.rng.uniform(0.02, 0.05) * self.size, max(2, self.size // 170)
        end = np.clip(self.pen + length * np.array([np.cos(angle), np.sin(angle)]), radius, self.size - 1 - radius)
        lo = np.floor(np.minimum(self.pen, end) - radius).astype(int).clip(0, self.size)
        hi = np.ceil(np.maximum(self.pen, end) + radius + 1).astype(int).clip(0, self.size)
        yy, xx = self.yy[lo[1]:hi[1], lo[0]:hi[0]], self.xx[lo[1]:hi[1], lo[0]:hi[0]]
        region = self.pixels[lo[1]:hi[1], lo[0]:hi[0]]
        for t in np.linspace(0, 1, 12):
            cx, cy = self.pen + t * (end - self.pen)
            region[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2] = color
        self.pen = end
        return int(np.any(self.pixels != before, axis=-1).sum())


def ns(stats: dict, model: str, *keys: str) -> int:
    """Sum of the cumulative nanoseconds `keys` (inference_stats' compute_infer, queue...) of `model`
    (the gRPC JSON spells int64 as strings and leaves out zeros)."""
    inference = stats[model].get("inference_stats", {})
    return sum(int(inference.get(key, {}).get("ns", 0)) for key in keys)


def count(stats: dict, model: str) -> int:
    return int(stats[model].get("inference_stats", {}).get("success", {}).get("count", 0))


def snapshot(client, admin: dict[str, str]) -> dict[str, dict]:
    """Triton's statistics of every loaded model (version 1), by name; `admin`: the admin key's metadata."""
    return {s["name"]: s for s in client.get_inference_statistics(model_name="", headers=admin, as_json=True)["model_stats"]}


def settled_snapshot(client, admin: dict[str, str], expected: int, timeout_s: float = 10.0,
                     endpoint: str = "ensemble_sdxl") -> dict[str, dict]:
    """The statistics once the endpoint and the last model of its chain have counted `expected`
    requests (every one sent so far): Triton records a request's statistics after its response is
    sent, so a snapshot taken at once can miss the last frame."""
    deadline = time.perf_counter() + timeout_s
    while True:
        stats = snapshot(client, admin)
        done = min(count(stats, endpoint), count(stats, "vae_decoder"))
        if done == expected:
            return stats
        if done > expected:
            raise RuntimeError(f"the server counted {done - expected} requests more than were sent: another client shares it")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the server counted {expected - done} requests fewer than were sent, {timeout_s:g} s on")
        time.sleep(0.05)


# A model's time on the frame's path. Triton 2.51's Python backend (every model of the CPU variant)
# sends a model's response at COMPUTE_OUTPUT_START: its compute_output (releasing the request, 0.1 to
# 6 ms here) runs while the next model, or the gRPC send, already works. Seen in a Triton trace
# (--trace-config level=TIMESTAMPS) of this benchmark's requests; counting it would count those ms twice.
ON_PATH = ("compute_input", "compute_infer")


def server_breakdown(before: dict, after: dict, frames: int) -> dict[str, float]:
    """Milliseconds per frame, server side, from the statistics' deltas over the measured frames."""
    def delta(model, *keys):
        return (ns(after, model, *keys) - ns(before, model, *keys)) / 1e6 / frames

    figures = {f"{model}_ms": delta(model, *ON_PATH) for model in NETWORKS}
    figures["networks_ms"] = sum(figures[f"{model}_ms"] for model in NETWORKS)
    figures["tokenizer_ms"] = delta("tokenizer", *ON_PATH)
    # The scheduler's compute includes waiting on its BLS calls: less their time in unet and
    # vae_encoder (queue + compute on the path), it is the loop's Python (scheduler math, tensor
    # conversions, the BLS calls' own marshalling).
    figures["scheduler_python_ms"] = (delta("scheduler", *ON_PATH)
                                      - sum(delta(model, "queue", *ON_PATH) for model in BLS_CALLEES))
    figures["python_ms"] = figures["tokenizer_ms"] + figures["scheduler_python_ms"]
    for model in (*NETWORKS, *PYTHON_MODELS):  # off the path (above); recorded, not counted
        figures[f"{model}_compute_output_ms"] = delta(model, "compute_output")
    figures["ensemble_request_ms"] = delta("ensemble_sdxl", "success")  # arrival to the end of the last model
    # The ensemble's answer leaves when vae_decoder sends it, before vae_decoder's compute_output ends.
    figures["server_ms"] = figures["ensemble_request_ms"] - figures["vae_decoder_compute_output_ms"]
    figures["ensemble_overhead_ms"] = figures["server_ms"] - figures["networks_ms"] - figures["python_ms"]
    figures["unet_calls_per_frame"] = (count(after, "unet") - count(before, "unet")) / frames
    figures["vae_encoder_calls_per_frame"] = (count(after, "vae_encoder") - count(before, "vae_encoder")) / frames
    return figures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def send_frame(client, canvas: Canvas | None, steps: int, strength: float | None, size: int) -> dict[str, float]:
    """One frame over the open connection, timed by phase (seconds)."""
    import tritonclient.grpc as grpcclient

    from client import MODEL, build_inputs, image_inputs

    start = time.perf_counter()
    if strength is None:
        inputs = build_inputs("grpc", PROMPT, seed=SEED, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size)
    else:
        inputs = build_inputs("grpc", PROMPT, seed=SEED, num_inference_steps=steps, guidance_scale=1.0)
        inputs += image_inputs("grpc", canvas.pixels, strength)
    built = time.perf_counter()
    outputs = [grpcclient.InferRequestedOutput("images"), grpcclient.InferRequestedOutput("seeds")]
    result = client.infer(MODEL, inputs, outputs=outputs)
    answered = time.perf_counter()
    images, seeds = result.as_numpy("images"), result.as_numpy("seeds")
    decoded = time.perf_counter()
    if images.shape != (1, size, size, 3) or images.dtype != np.uint8 or [int(s) for s in seeds] != [SEED]:
        raise RuntimeError(f"unexpected answer: images {images.shape} {images.dtype}, seeds {list(seeds)}")
    return {"build": built - start, "infer": answered - built, "decode": decoded - answered, "total": decoded - start}


def generate_frames(url: str, canvas: Canvas | None, steps: int, strength: float | None, size: int, frames: int) -> list[float]:
    """client.generate() per frame, as a script would call it (a new gRPC channel each call): seconds."""
    from client import generate

    seconds = []
    for _ in range(frames):
        if canvas is not None:
            canvas.stroke()
        start = time.perf_counter()
        generate(PROMPT, url=url, protocol="grpc", seed=SEED, num_inference_steps=steps, guidance_scale=1.0,
                 image=None if canvas is None else canvas.pixels, strength=strength,
                 height=size if canvas is None else None, width=size if canvas is None else None)
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_config(client, admin: dict[str, str], url: str, name: str, steps: int, strength: float | None, size: int, frames: int,
                   warmup: int, generate_count: int, sent: int) -> dict:
    """One configuration's session; `sent`: the requests sent to the server before it."""
    canvas = Canvas(size) if strength is not None else None
    for _ in range(warmup):
        if canvas is not None:
            canvas.stroke()
        send_frame(client, canvas, steps, strength, size)
    before = settled_snapshot(client, admin, sent + warmup)
    timings, changed = [], []
    start = time.perf_counter()
    for _ in range(frames):
        if canvas is not None:
            changed.append(canvas.stroke())
        timings.append(send_frame(client, canvas, steps, strength, size))
    wall = time.perf_counter() - start
    after = settled_snapshot(client, admin, sent + warmup + frames)
    server = server_breakdown(before, after, frames)
    totals = [1000 * t["total"] for t in timings]

    def mean_ms(key):
        return 1000 * sum(t[key] for t in timings) / frames

    row = {
        "config": name, "num_inference_steps": steps, "strength": strength, "size": size, "frames": frames, "warmup": warmup,
        "unet_steps": max(1, int(steps * strength)) if strength is not None else steps,
        "pixels_changed_per_frame": float(np.mean(changed)) if changed else None,
        "fps": frames / wall, "latency_median_ms": float(np.median(totals)), "latency_p95_ms": percentile(totals, 0.95),
        "latency_min_ms": min(totals), "latency_mean_ms": sum(totals) / frames,
        "client_encode_ms": mean_ms("build"), "infer_call_ms": mean_ms("infer"), "client_decode_ms": mean_ms("decode"),
        **server, "load_average_1min": os.getloadavg()[0],  # at the end of the measured frames
    }
    # The infer call less the ensemble's request time: tritonclient's protobuf request and response,
    # the gRPC round trip on loopback, Triton's gRPC front end.
    row["transfer_ms"] = row["infer_call_ms"] - row["server_ms"]
    row["outside_ms"] = row["latency_mean_ms"] - row["networks_ms"] - row["python_ms"]
    if generate_count:
        seconds = generate_frames(url, canvas, steps, strength, size, generate_count)
        row["generate_frames"] = generate_count
        row["generate_median_ms"] = 1000 * float(np.median(seconds))
    log(f"{name}: {row['fps']:.2f} frames/s, latency median {row['latency_median_ms']:.0f} ms (p95 "
        f"{row['latency_p95_ms']:.0f}, min {row['latency_min_ms']:.0f}); networks {row['networks_ms']:.1f} ms ("
        + ", ".join(f"{model} {row[model + '_ms']:.1f}" for model in NETWORKS) + "), Python "
        f"{row['python_ms']:.1f} ms, outside {row['outside_ms']:.1f} ms; UNet calls per frame {row['unet_calls_per_frame']:.2f}")
    return row


def session_breakdown(client, admin: dict[str, str], url: str, name: str, steps: int, size: int, frames: int, warmup: int,
                      sent: int, first_id: int = 0) -> dict:
    """One session's frames on one `sdxl_stream` stream, each sent when the previous one's final response
    arrived (a closed loop, so no frame is skipped), and where a frame's time goes: the networks
    (Triton's statistics, as for the ensemble) and everything outside them (the frame's latency less
    the networks: the stream's and the denoiser's Python, BLS hand-offs, gRPC, the client's encode and
    decode). `sent`: the frames the server's vae_decoder answered before; the frames' request ids count from
    `first_id` (the warm-up's first); `frame_ms`: each measured frame's latency, in order."""
    import queue

    import tritonclient.grpc as grpcclient

    from client import STREAM_MODEL, request_inputs

    canvas, answers = Canvas(size, seed=11), queue.Queue()
    session = np.array([f"bench-{name}".encode()], dtype=np.object_)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("images", "seeds", "step", "num_inference_steps", "skipped")]
    client.start_stream(callback=lambda result, error: answers.put((result, error)))

    def frame(index: int) -> float:
        canvas.stroke()
        start = time.perf_counter()
        inputs = request_inputs("grpc", PROMPT, seed=SEED, num_inference_steps=steps, strength=STRENGTH, guidance_scale=1.0,
                                image=canvas.pixels)
        tensor = grpcclient.InferInput("session_id", [1], "BYTES")
        tensor.set_data_from_numpy(session)
        client.async_stream_infer(STREAM_MODEL, [*inputs, tensor], request_id=str(index), outputs=outputs)
        while True:
            result, error = answers.get(timeout=60)
            if error is not None:
                raise RuntimeError(f"session frame {index}: {error}")
            if int(result.as_numpy("step")[0]) == int(result.as_numpy("num_inference_steps")[0]):
                break
        images = result.as_numpy("images")
        if images is None or images.shape != (1, size, size, 3) or bool(result.as_numpy("skipped")[0]):
            raise RuntimeError(f"session frame {index}: unexpected answer (skipped {result.as_numpy('skipped')})")
        return time.perf_counter() - start

    try:
        for index in range(warmup):
            frame(first_id + index)
        before = settled_snapshot(client, admin, sent + warmup, endpoint="vae_decoder")
        seconds = [frame(first_id + warmup + index) for index in range(frames)]
        after = settled_snapshot(client, admin, sent + warmup + frames, endpoint="vae_decoder")
    finally:
        client.stop_stream()

    def delta(model, *keys):
        return (ns(after, model, *keys) - ns(before, model, *keys)) / 1e6 / frames

    totals = [1000 * s for s in seconds]
    row = {"config": name, "num_inference_steps": steps, "unet_steps": max(1, int(steps * STRENGTH)), "frames": frames,
           "fps": frames / sum(seconds), "latency_median_ms": float(np.median(totals)), "latency_p95_ms": percentile(totals, 0.95),
           "latency_mean_ms": sum(totals) / frames, **{f"{model}_ms": delta(model, *ON_PATH) for model in NETWORKS},
           "frame_ms": totals}
    row["networks_ms"] = sum(row[f"{model}_ms"] for model in NETWORKS)
    row["outside_ms"] = row["latency_mean_ms"] - row["networks_ms"]
    # The denoiser's execute: checking the request, encoding its image (vae_encoder, BLS) and building its loop.
    row["denoiser_python_ms"] = delta("denoiser", *ON_PATH) - delta("vae_encoder", "queue", *ON_PATH)
    row["tokenizer_calls_per_frame"] = (count(after, "tokenizer") - count(before, "tokenizer")) / frames
    hits = [int(stats["text_encoder"].get("inference_stats", {}).get("cache_hit", {}).get("count", 0)) for stats in (before, after)]
    row["text_encoder_cache_hits_per_frame"] = (hits[1] - hits[0]) / frames
    log(f"session closed loop, {name}: {row['fps']:.2f} frames/s, latency median {row['latency_median_ms']:.0f} ms; networks "
        f"{row['networks_ms']:.1f} ms, outside {row['outside_ms']:.1f} ms (denoiser's Python {row['denoiser_python_ms']:.1f} ms)")
    return row


# Where a session's frame's time goes, from Triton's trace of each frame (sdxl_stream's request and its BLS
# callees: text_encoder, denoiser and the denoiser's vae_encoder, vae_decoder) and the client's latency:
# (name, what it covers). The UNet runs in the denoiser's engine thread, whose calls are not traced: the
# engine's part is the time from the denoiser's execute returning to the stream's vae_decoder call, and
# the UNet's compute in it comes from Triton's statistics.
TRACE_SEGMENTS = (
    ("client and gRPC in", "the client building and sending the request, the gRPC front end reading it, and "
                           "the client reading the response: its latency less the server's time from reading the "
                           "request to sending the response"),
    ("to the stream", "Triton handing the request to a free sdxl_stream instance (its queue, the stub's receive)"),
    ("stream: checks, session, tokens, admission", "sdxl_stream's Python up to its text_encoder call"),
    ("text_encoder call (prompt cache hit)", "the BLS call the response cache answers"),
    ("stream: to the denoiser", "sdxl_stream's Python from the embeddings to its denoiser call"),
    ("to the denoiser", "Triton handing the BLS request to the denoiser (queue, the stub's receive)"),
    ("denoiser: before the image", "the denoiser's Python checking the request, up to its vae_encoder call"),
    ("vae_encoder: hand-off", "the vae_encoder BLS call less the network's compute"),
    ("denoiser: building the loop", "the denoiser's Python after the image is encoded: the request's loop, its copies"),
    ("engine, outside the UNet", "the engine thread picking the request up, the UNet BLS hand-offs, the scheduler's "
                                 "step, the final latents sent to the stream"),
    ("vae_decoder: hand-off", "the vae_decoder BLS call less the network's compute"),
    ("stream: finish and send", "sdxl_stream from the decoded images to the gRPC front end starting to send its final "
                                "response (the outputs checked, the response made and handed over)"),
    ("gRPC out", "Triton's gRPC front end sending the final response"),
)


def frame_segments(stream, client_ms: float, unet_ms: float) -> dict[str, float]:
    """One session frame's time (ms) by TRACE_SEGMENTS, and the networks' compute, from its trace
    (benchmarks.traces.Traced of its sdxl_stream request), the client's latency and the UNet's mean compute."""
    text, denoiser, decoder = (stream.child(model) for model in ("text_encoder", "denoiser", "vae_decoder"))
    encoder = denoiser.child("vae_encoder")

    def between(first, first_stamp: str, second, second_stamp: str) -> float:
        return (second.ns[second_stamp] - first.ns[first_stamp]) / 1e6

    server = stream.ms("GRPC_WAITREAD_END", "GRPC_SEND_END")
    engine = between(denoiser, "COMPUTE_END", decoder, "REQUEST_START")
    values = (client_ms - server, stream.ms("GRPC_WAITREAD_END", "COMPUTE_START"),
              between(stream, "COMPUTE_START", text, "REQUEST_START"), text.span_ms,
              between(text, "REQUEST_END", denoiser, "REQUEST_START"), denoiser.ms("REQUEST_START", "COMPUTE_START"),
              between(denoiser, "COMPUTE_START", encoder, "REQUEST_START"), encoder.span_ms - encoder.compute_ms,
              between(encoder, "REQUEST_END", denoiser, "COMPUTE_END"), engine - unet_ms,
              decoder.span_ms - decoder.compute_ms, between(decoder, "REQUEST_END", stream, "GRPC_SEND_START"),
              stream.ms("GRPC_SEND_START", "GRPC_SEND_END"))  # the final response's (Traced.ns: the last)
    segments = dict(zip((name for name, _ in TRACE_SEGMENTS), values))
    segments.update(networks=text.compute_ms + encoder.compute_ms + unet_ms + decoder.compute_ms, frame=client_ms)
    return segments


def traced_sessions(repository: Path, work: Path, size: int, frames: int, warmup: int) -> list[dict]:
    """Each img2img configuration's session frames, closed loop, on a server that traces every request:
    the mean of frame_segments over the measured frames. A server of its own, so that tracing (a file per
    frame) touches no other figure here."""
    import tritonclient.grpc as grpcclient

    from .traces import read_traces

    trace_file = work / "traces" / "trace.json"
    log("starting a tritonserver that traces every request ...")
    runs, first_id, sent = [], 0, 0
    with started_server(repository, work / "tritonserver-traced.log", trace_file=trace_file, trace_rate=1,
                        trace_log_frequency=1) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for name, steps, strength in CONFIGS:
                if strength is not None:
                    row = session_breakdown(client, server.admin_headers("grpc"), server.grpc_url, f"traced-{name}", steps, size,
                                            frames, warmup, sent, first_id)
                    runs.append((row, [str(first_id + warmup + index) for index in range(frames)]))
                    first_id, sent = first_id + warmup + frames, sent + warmup + frames
        finally:
            client.close()
        time.sleep(1.0)  # the last frames' traces written
    traced = {root.request_id: root for root in read_traces(trace_file) if root.model == "sdxl_stream"}
    rows = []
    for row, ids in runs:
        missing = [i for i in ids if i not in traced]
        if missing:
            raise RuntimeError(f"traced sessions: no trace of frames {missing[:5]} (of {len(ids)})")
        per_frame = [frame_segments(traced[i], ms, row["unet_ms"]) for i, ms in zip(ids, row["frame_ms"])]
        mean = {key: sum(frame[key] for frame in per_frame) / len(per_frame) for key in per_frame[0]}
        mean["outside"] = sum(mean[name] for name, _ in TRACE_SEGMENTS)
        rows.append({"config": row["config"].removeprefix("traced-"), "frames": frames, "segments_ms": mean})
        log(f"traced session, {rows[-1]['config']}: frame {mean['frame']:.1f} ms, networks {mean['networks']:.1f} ms, "
            f"outside {mean['outside']:.1f} ms")
    return rows


SESSION_RATES = (0.5, 1.0, 2.0)  # the session's sending rate over the server's closed-loop frame rate


def cache_counts(server) -> tuple[float, float]:
    """(hits, misses) of the prompt cache (Triton's response cache on text_encoder), from the metrics port."""
    import urllib.request

    with urllib.request.urlopen(f"http://{server.connect_host}:{server.metrics_port}/metrics") as response:
        text = response.read().decode()
    found = dict.fromkeys(("nv_cache_num_hits_per_model", "nv_cache_num_misses_per_model"), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in found and 'model="text_encoder"' in line:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found["nv_cache_num_hits_per_model"], found["nv_cache_num_misses_per_model"]


def session_run(server, name: str, steps: int, server_fps: float, rate: float, changing: bool, frames: int, size: int) -> dict:
    """One session sent open-loop at `rate` x the server's frame rate."""
    from client import generate_session

    canvas, send_fps = Canvas(size, seed=7), server_fps * rate

    def paced():
        start = time.perf_counter()
        for index in range(frames):
            time.sleep(max(0.0, start + index / send_fps - time.perf_counter()))
            canvas.stroke()
            # A changing prompt is new to the server in every run: the run, then the frame.
            yield {"prompt": f"{PROMPT}, {name}, {rate:g}x, take {index}" if changing else PROMPT, "image": canvas.pixels.copy()}

    hits, misses = cache_counts(server)
    start = time.perf_counter()
    answers = list(generate_session(paced(), url=server.grpc_url, seed=SEED, num_inference_steps=steps, strength=STRENGTH,
                                    guidance_scale=1.0))
    wall = time.perf_counter() - start
    after = cache_counts(server)
    ran = [1000 * answer.seconds for answer in answers if not answer.skipped]
    frame_ms = 1000 / server_fps
    row = {"config": name, "num_inference_steps": steps, "prompt": "changing" if changing else "unchanged", "rate": rate,
           "send_fps": send_fps, "frames": frames, "answered": len(ran), "skipped": frames - len(ran),
           "fps": len(ran) / wall, "latency_median_ms": float(np.median(ran)), "latency_p95_ms": percentile(ran, 0.95),
           "frame_ms": frame_ms, "p95_over_frame": percentile(ran, 0.95) / frame_ms,
           "cache_hits": after[0] - hits, "cache_misses": after[1] - misses}
    log(f"session {name}, prompt {row['prompt']}, sent at {rate:g}x ({send_fps:.2f}/s): {row['fps']:.2f} frames/s answered, "
        f"{row['skipped']} of {frames} skipped, latency median {row['latency_median_ms']:.0f} ms, p95 {row['latency_p95_ms']:.0f} "
        f"ms ({row['p95_over_frame']:.2f} frame times); prompt cache {row['cache_hits']:.0f} hits, {row['cache_misses']:.0f} misses")
    return row


def measure(repository: Path, size: int, frames: int, warmup: int, generate_count: int, work: Path,
            session_frames: int = 0) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(the ensemble's closed-loop rows, a session's closed-loop rows, the open-loop session runs, a session's
    frames traced: where their time goes)."""
    import tritonclient.grpc as grpcclient

    log("starting tritonserver ...")
    rows, closed, sessions = [], [], []
    with started_server(repository, work / "tritonserver.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            sent = 0
            for name, steps, strength in CONFIGS:
                rows.append(measure_config(client, server.admin_headers("grpc"), server.grpc_url, name, steps, strength, size, frames, warmup,
                                           generate_count, sent))
                sent += warmup + frames + generate_count
            for name, steps, strength in CONFIGS if session_frames else ():
                if strength is not None:
                    closed.append(session_breakdown(client, server.admin_headers("grpc"), server.grpc_url, name, steps, size,
                                                    frames, warmup, sent))
                    sent += warmup + frames
        finally:
            client.close()
        for row in closed:  # paced by the server's rate for a session's frames: its closed loop's
            for changing in (False, True):
                for rate in SESSION_RATES:
                    sessions.append(session_run(server, row["config"], row["num_inference_steps"], row["fps"], rate, changing,
                                                session_frames, size))
    traced = traced_sessions(repository, work, size, frames, warmup) if session_frames else []
    return rows, closed, sessions, traced


def estimate(rows: list[dict], size: int, closed: list[dict] = ()) -> dict:
    """An H100/H200 estimate per img2img configuration: the published 1024² TensorRT figures scaled to
    `size` by pixel count, plus this run's measured non-network time as an upper-bound guess. Every
    figure here is an estimate, not a measurement."""
    scale = (size / 1024) ** 2
    vae_decoder = (H100_1024["vae_decode_tf32_ms"] * scale / FP16_VAE_SPEEDUP, H100_1024["vae_decode_tf32_ms"] * scale)
    unet_low = H100_1024["unet_step_ms"] * scale
    # The top of the UNet range: SDXL-Turbo's 4 steps at 512² on H100 less a TF32 VAE decode and the text encoders.
    turbo_step = (H100_TURBO_512_4_STEPS_MS - H100_1024["vae_decode_tf32_ms"] / 4 - H100_1024["text_encoders_ms"]) / 4
    unet = (unet_low, max(turbo_step * scale * 4, unet_low))
    vae_encoder = (vae_decoder[0] * VAE_ENCODER_RATIO[0], vae_decoder[1] * VAE_ENCODER_RATIO[1])
    text = H100_1024["text_encoders_ms"]
    configs = []
    for row in rows:
        if row["strength"] is None:
            continue
        k = row["unet_steps"]
        networks = (text + k * unet[0] + vae_encoder[0] + vae_decoder[0], text + k * unet[1] + vae_encoder[1] + vae_decoder[1])
        overhead = row["python_ms"] + row["outside_ms"]  # measured here: Python models, transfer, encode, decode, ensemble
        configs.append({
            "config": row["config"], "unet_steps": k, "networks_ms": networks, "overhead_ms": overhead,
            "latency_ms": (networks[0] + overhead, networks[1] + overhead),
            "fps": (1000 / (networks[1] + overhead), 1000 / (networks[0] + overhead)),
            "fps_networks_only": (1000 / networks[1], 1000 / networks[0]),
        })
        session = next((c["outside_ms"] for c in closed if c["config"] == row["config"]), None)  # a session's frame, measured here
        if session is not None:
            configs[-1].update(session_overhead_ms=session, session_latency_ms=(networks[0] + session, networks[1] + session),
                               session_fps=(1000 / (networks[1] + session), 1000 / (networks[0] + session)))
    return {"size": size, "pixel_scale": scale, "text_encoders_ms": text, "unet_step_ms": unet,
            "vae_decoder_ms": vae_decoder, "vae_encoder_ms": vae_encoder, "configs": configs}


def fmt_range(pair, digits: int = 0) -> str:
    low, high = pair
    return f"{low:.{digits}f} to {high:.{digits}f}"


def write_table(results: dict, path: Path) -> None:
    rows, est = results["rows"], results["estimate"]
    first = rows[0]
    lines = [
        "# Real-time painting (img2img over gRPC, frames one after another)", "",
        f"`{results['command']}`, {results['machine']}, no GPU, {results['minutes']:.1f} min. The tiny random-weight "
        f"SDXL pipeline, CPU variant (ONNX Runtime in Python-backend models), fp32, a real tritonserver with the "
        f"repository's configs. A painting session: a {first['size']}x{first['size']} RGB canvas to which each frame "
        f"adds one short brush stroke (about {first['pixels_changed_per_frame']:.0f} pixels changed per frame), "
        f"{first['warmup']} warm-up frames then {first['frames']} measured frames per configuration, each sent when the "
        "previous answer arrived, over one gRPC connection kept open; same prompt and seed every frame, guidance 1.0 "
        "(no CFG), one image, strength 0.5. See benchmarks/painting.py. The machine's 1-minute load average was "
        f"{results['load_average_1min'][0]:.1f} at the start and {results['load_average_1min'][1]:.1f} at the end "
        "(2 cores: the server's models and the client share them).", "",
        "The tiny model's networks are a few layers wide: their times say nothing of SDXL's. What carries over to a "
        "GPU deployment is the time outside the networks (the Python models, transfer, encode, decode), which does "
        "not depend on the networks' size.", "",
        "## Frames per second and latency per frame", "",
        "| configuration | UNet steps | frames/s | latency median | p95 | min | `generate()` median (new channel per call) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        generated = f"{r['generate_median_ms']:.0f} ms ({r['generate_frames']} frames)" if "generate_median_ms" in r else "-"
        lines.append(f"| {r['config']} | {r['unet_steps']} | {r['fps']:.2f} | {r['latency_median_ms']:.0f} ms "
                     f"| {r['latency_p95_ms']:.0f} ms | {r['latency_min_ms']:.0f} ms | {generated} |")
    lines += [
        "", "## Where one frame's time goes (mean per frame, ms)", "",
        "| configuration | frame (client) | text_encoder | unet | vae_encoder | vae_decoder | **networks** | tokenizer "
        "| scheduler Python | **Python** | ensemble and queues | gRPC transfer | client encode | client decode | **outside** |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['latency_mean_ms']:.1f} | {r['text_encoder_ms']:.1f} | {r['unet_ms']:.1f} "
            f"| {r['vae_encoder_ms']:.1f} | {r['vae_decoder_ms']:.1f} | **{r['networks_ms']:.1f}** | {r['tokenizer_ms']:.1f} "
            f"| {r['scheduler_python_ms']:.1f} | **{r['python_ms']:.1f}** | {r['ensemble_overhead_ms']:.1f} "
            f"| {r['transfer_ms']:.1f} | {r['client_encode_ms']:.1f} | {r['client_decode_ms']:.1f} | **{r['outside_ms']:.1f}** |")
    lines += [
        "", "What each column includes:", "",
        "- *frame (client)*: the client's own timing of a frame, mean: building the request + the `infer` call + "
        "decoding the answer (the latency table's median, p95 and min are of the same figure).",
        "- *text_encoder, unet, vae_encoder, vae_decoder*: Triton's statistics for that model, compute_input + "
        "compute_infer, delta over the measured frames / frames. Not compute_output: Triton 2.51's Python backend "
        "sends a model's response when compute_output starts, and the compute_output interval (releasing the request: "
        "0.1 to 6 ms per model here, in the JSON as *_compute_output_ms) runs while the next model, or the gRPC send, "
        "already works, as a Triton trace of these requests (`--trace-config level=TIMESTAMPS`) shows; counting it "
        "would count those ms twice. On this CPU variant each network is ONNX Runtime inside a Python-backend "
        "model, so these include the Python backend's tensor hand-off (shared memory) as well as the graph; in "
        "production they are TensorRT engines (whose compute_output, the output copy, is on the path). The text "
        "encoder runs for the first frame only: the prompt cache (Triton's response cache) answers the others, "
        "which count nothing here.",
        "- *tokenizer*: its compute_input + compute_infer (Python model). *scheduler Python*: the scheduler's "
        "compute_input + compute_infer less the time its BLS calls spent in unet and vae_encoder (queue + "
        "compute_input + compute_infer there): the denoising loop's Python, the LCM step math, converting tensors, "
        "making the BLS calls.",
        "- *ensemble and queues*: the ensemble's request time (Triton's statistics: arrival to the end of its last "
        "model, less vae_decoder's compute_output, which overlaps the gRPC send) less the networks and the Python "
        "models: queueing in each model, the ensemble's hand-offs between its steps, the BLS requests' routing.",
        "- *gRPC transfer*: the client's `infer` call less that server time: tritonclient building the protobuf "
        "request (copying the 768 KiB image in) and reading the response (768 KiB out), the gRPC round trip on "
        "loopback, Triton's gRPC front end.",
        "- *client encode*: `client.build_inputs` + `client.image_inputs` (the InferInputs; numpy to bytes). "
        "*client decode*: `result.as_numpy` for images and seeds. Timed with perf_counter around each call.",
        "- *outside* = frame (client) - networks - Python = ensemble and queues + gRPC transfer + client encode + "
        "client decode: everything that is neither a network nor a Python model.",
        "- `generate()`: the client library's one-call function over `--generate-frames` further frames; it opens "
        "a gRPC channel per call, which the difference to the latency median shows.", "",
        "UNet calls per frame (Triton's count): "
        + ", ".join(f"{r['config']}: {r['unet_calls_per_frame']:.0f}" for r in rows)
        + "; VAE encoder calls per frame: " + ", ".join(f"{r['vae_encoder_calls_per_frame']:.0f}" for r in rows) + ".",
        "",
        "## H100/H200 estimate (an estimate, not a measurement: no GPU was available)", "",
        f"Basis: published TensorRT figures for SDXL + LCM at 1024², batch 1, on an H100 (NVIDIA/Stability, Hugging "
        f"Face card stabilityai/stable-diffusion-xl-1.0-tensorrt; ../shared/DESIGN.md): text encoders 0.78 ms, UNet "
        f"102.8 ms for 4 steps (about 26 ms a step), VAE decode 127 ms with a TF32 VAE. Also published: SDXL-Turbo "
        f"at 512², 4 steps, H100 TensorRT: {H100_TURBO_512_4_STEPS_MS} ms in all; SDXL-Turbo at 512² on an A100: one "
        f"UNet pass {A100_TURBO_512['unet_pass_ms']:.0f} ms, {A100_TURBO_512['total_ms']:.0f} ms in all. Scaled to "
        f"{est['size']}² by pixel count (x{est['pixel_scale']:.2f}):", "",
        f"- UNet, one step: {fmt_range(est['unet_step_ms'], 1)} ms. The low end scales 26 ms by pixel count. The UNet "
        "does not scale linearly: its attention grows with the square of the token count (which by FLOPs would make "
        "a smaller image cheaper than linear), but a 512² batch of one fills an H100 far less than a 1024² one "
        "(fixed per-layer costs, kernel launches), so in practice it costs more than a quarter. The high end is "
        f"SDXL-Turbo's published 512² figure: ({H100_TURBO_512_4_STEPS_MS} ms - a 512² TF32 VAE decode of "
        f"{127 / 4:.0f} ms - 0.78 ms) / 4 steps.",
        f"- VAE decoder: {fmt_range(est['vae_decoder_ms'], 1)} ms: 127 ms x {est['pixel_scale']:.2f} with the "
        "published TF32 VAE (high end); this repository serves the fp16-fix VAE in fp16, about half (low end, "
        "itself an estimate).",
        f"- VAE encoder: {fmt_range(est['vae_encoder_ms'], 1)} ms: estimated at 0.4 to 0.5x the decoder at equal "
        "size (SDXL's encoder has about 34 M parameters against the decoder's 49 M and runs at falling resolution "
        "on the way down). No published figure: an estimate.",
        "- Text encoders: 0.78 ms (77 tokens whatever the image size).",
        "- Everything else: this run's measured Python + outside time per frame (tokenizer, scheduler loop, "
        "ensemble, gRPC transfer of the 512² image both ways, client encode and decode), carried over as it is: an "
        "upper-bound guess, since this 2-core machine also runs the networks on the same cores and a GPU host's CPU "
        "is faster; on a GPU the scheduler's tensors live on the GPU and the image crosses PCIe (not counted). The rows of "
        "a session's frame carry that frame's measured outside time instead (below: the stream, the denoiser, gRPC).", "",
        "| configuration | networks (estimate) | overhead (measured here, carried over) | latency per frame (estimate) "
        "| frames/s (estimate) | frames/s, networks only (ceiling) |",
        "|---|---|---|---|---|---|",
    ]
    for c in est["configs"]:
        lines.append(f"| {c['config']} | {fmt_range(c['networks_ms'])} ms | {c['overhead_ms']:.0f} ms "
                     f"| {fmt_range(c['latency_ms'])} ms | {fmt_range(c['fps'], 1)} | {fmt_range(c['fps_networks_only'], 1)} |")
        if "session_overhead_ms" in c:
            lines.append(f"| {c['config']}, a session's frame (`sdxl_stream`) | {fmt_range(c['networks_ms'])} ms "
                         f"| {c['session_overhead_ms']:.0f} ms | {fmt_range(c['session_latency_ms'])} ms | {fmt_range(c['session_fps'], 1)} "
                         f"| {fmt_range(c['fps_networks_only'], 1)} |")
    lines += [
        "", "An H200 runs these at about an H100's speed or a little faster (same compute, more memory bandwidth); "
        "the range covers both. Not counted: CFG (off here), a larger batch, TensorRT's own launch overheads beyond "
        "the published figures, the browser's or app's side of a real painting tool (capture, upload over a real "
        "network, display).",
    ]
    if results.get("session_rows"):
        lines += [
            "", "## A session's frame, closed loop (`sdxl_stream`): where its time goes (mean per frame, ms)", "",
            "The same canvas and request as above, each frame with a `session_id` on one gRPC stream and sent when the "
            "previous one's final response arrived (so none is skipped). *outside* = the frame's latency (the client's, "
            "from building the request to its final response) less the networks (Triton's statistics, as above): the "
            "stream's and the denoiser's Python, the BLS hand-offs, gRPC, the client's encode and decode. The stream "
            "tokenizes and admits in its own process (no tokenizer call) and the prompt cache answers the text encoder.", "",
            "| configuration | frames/s | latency median | p95 | text_encoder | unet | vae_encoder | vae_decoder | **networks** "
            "| denoiser's Python | **outside** | tokenizer calls / frame | text_encoder cache hits / frame |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["session_rows"]:
            lines.append(f"| {r['config']} | {r['fps']:.2f} | {r['latency_median_ms']:.0f} ms | {r['latency_p95_ms']:.0f} ms | "
                         + " | ".join(f"{r[model + '_ms']:.1f}" for model in NETWORKS)
                         + f" | **{r['networks_ms']:.1f}** | {r['denoiser_python_ms']:.1f} | **{r['outside_ms']:.1f}** "
                         f"| {r['tokenizer_calls_per_frame']:.2f} | {r['text_encoder_cache_hits_per_frame']:.2f} |")
    if results.get("traced_sessions"):
        traced = results["traced_sessions"]
        lines += [
            "", "## A session's frame, traced: where the time outside the networks goes (mean per frame, ms)", "",
            f"The closed-loop session above again, {traced[0]['frames']} measured frames per configuration, on a second "
            "tritonserver that traces every request (`TritonServer(trace_file=...)`: Triton's TIMESTAMPS traces, the BLS "
            "calls under the request that made them; docs/serving.md, \"Tracing a request\"). Each row is an interval "
            "between two of a frame's trace timestamps (benchmarks/painting.py TRACE_SEGMENTS); a network's *hand-off* is "
            "its BLS call less its compute_input + compute_infer. The UNet's calls, made by the engine's thread for "
            "whichever requests share a step, are not traced: its compute comes from Triton's statistics. Tracing costs "
            "a little itself (a file written per frame).", "",
            "| part of the frame | what it covers | " + " | ".join(r["config"] for r in traced) + " |",
            "|---|---|" + "---|" * len(traced),
        ]
        for name, covers in TRACE_SEGMENTS:
            lines.append(f"| {name} | {covers} | " + " | ".join(f"{r['segments_ms'][name]:.1f}" for r in traced) + " |")
        lines += ["| **outside the networks** | the rows above | " + " | ".join(f"**{r['segments_ms']['outside']:.1f}**" for r in traced) + " |",
                  "| networks | text_encoder (0: the cache answers), vae_encoder, unet, vae_decoder compute | "
                  + " | ".join(f"{r['segments_ms']['networks']:.1f}" for r in traced) + " |",
                  "| frame | the client's latency | " + " | ".join(f"{r['segments_ms']['frame']:.1f}" for r in traced) + " |"]
    if results.get("sessions"):
        lines += [
            "", "## Sessions: latest wins (`sdxl_stream`, `session_id`)", "",
            "One session on one gRPC stream (`client.generate_session`), its frames sent open-loop at half, equal and "
            "twice the session's closed-loop frame rate above (the server's rate for a session's frames), the prompt "
            "unchanged (the prompt cache hits) "
            "or changed on every frame (misses). Frames per second answered with an image; latency from each answered "
            "frame's sending to its final response; a frame superseded before it started is answered as skipped.", "",
            "| configuration | prompt | sent at | frames/s answered | skipped | latency median | p95 | p95 / frame time "
            "| prompt cache hits / misses |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["sessions"]:
            lines.append(f"| {r['config']} | {r['prompt']} | {r['rate']:g}x ({r['send_fps']:.2f}/s) | {r['fps']:.2f} "
                         f"| {r['skipped']} of {r['frames']} | {r['latency_median_ms']:.0f} ms | {r['latency_p95_ms']:.0f} ms "
                         f"| {r['p95_over_frame']:.2f} | {r['cache_hits']:.0f} / {r['cache_misses']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("painting", __doc__, "painting_cpu")
    parser.add_argument("--frames", type=int, default=60, help="measured frames per configuration (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up frames per configuration (default %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="the canvas' side in pixels (default %(default)s)")
    parser.add_argument("--session-frames", type=int, default=24,
                        help="frames per session run (3 rates x 2 prompt modes x 2 configurations; 0: none; default %(default)s)")
    parser.add_argument("--generate-frames", type=int, default=10,
                        help="further frames per configuration through client.generate() (0: none; default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.frames < 1 or args.warmup < 0 or args.generate_frames < 0 or args.session_frames < 0:
        parser.error("--frames must be at least 1, --warmup, --generate-frames and --session-frames at least 0")
    started, load = time.time(), [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-painting-") as tmp:
        work = Path(tmp)
        repository = prepare_repository(work, batching=True, schedulers=4, tiny=tiny_pipeline(work))
        rows, closed, sessions, traced = measure(repository, args.size, args.frames, args.warmup, args.generate_frames, work,
                                                 args.session_frames)
    load.append(os.getloadavg()[0])
    save_run("painting", argv, started, args, parser, {"load_average_1min": load, "rows": rows, "session_rows": closed,
                                                       "sessions": sessions, "traced_sessions": traced,
                                                       "estimate": estimate(rows, args.size, closed)},
             write_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
