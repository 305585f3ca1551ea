"""The scheduler's, the denoiser's and the streaming endpoint's custom metrics, exported by Triton on its metrics port with the
standard ones.

All instances of the scheduler share each metric (same name, same labels), so the figures are the
model's, not an instance's.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

# Seconds: 1 ms (a TensorRT UNet step at 512²) to 10 s (the CPU variant under load).
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
STEP_BUCKETS = [1, 2, 3, 4, 5, 6, 7, 8]
ROW_BUCKETS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16]
# Shared by the scheduler's loop and the denoiser's engine (same family: both count UNet samples).
UNET_SAMPLES = ("sdxl_unet_samples_total", "Latent samples sent through the UNet (CFG counts two per image)")


class SchedulerMetrics:
    def __init__(self, model: str):
        labels = {"model": model}
        family = pb_utils.MetricFamily
        # The families must outlive their metrics: keep both.
        self._families = {
            "latency": family("sdxl_unet_step_latency_seconds", "UNet call latency per denoising step, as the scheduler sees it (BLS round trip)", family.HISTOGRAM),
            "steps": family("sdxl_steps_per_request", "Denoising steps per request", family.HISTOGRAM),
            "samples": family(*UNET_SAMPLES, family.COUNTER),
            "batch": family("sdxl_unet_request_batch_size", "UNet batch of the latest step a request sent (before Triton merges requests)", family.GAUGE),
            "inflight": family("sdxl_scheduler_requests_in_flight", "Requests inside the denoising loop now", family.GAUGE),
            "wait": family("sdxl_queue_wait_seconds", "Time an admitted request waited for a denoising slot", family.HISTOGRAM),
        }
        self.unet_latency = self._families["latency"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.steps_per_request = self._families["steps"].Metric(labels=labels, buckets=STEP_BUCKETS)
        self.unet_samples = self._families["samples"].Metric(labels=labels)
        self.unet_batch = self._families["batch"].Metric(labels=labels)
        self.in_flight = self._families["inflight"].Metric(labels=labels)
        self.queue_wait = self._families["wait"].Metric(labels=labels, buckets=LATENCY_BUCKETS)

    def unet_step(self, seconds: float, batch: int) -> None:
        self.unet_latency.observe(seconds)
        self.unet_samples.increment(batch)
        self.unet_batch.set(batch)


class AdmissionMetrics:
    """Requests admitted to the denoising queue and refused (by reason), shared by the instances of
    the model that counts them (the tokenizer admits; the scheduler refuses on queue timeout)."""

    REASONS = ("capacity", "draining", "queue_timeout")

    def __init__(self, model: str):
        family = pb_utils.MetricFamily
        self._families = (
            family("sdxl_admitted_requests_total", "Requests admitted to the denoising queue", family.COUNTER),
            family("sdxl_refused_requests_total", "Requests refused with UNAVAILABLE: at capacity (max_queue_size), "
                   "draining (shutdown or restart), or over their queue timeout", family.COUNTER),
        )
        self.admitted = self._families[0].Metric(labels={"model": model})
        self._refused = {reason: self._families[1].Metric(labels={"model": model, "reason": reason}) for reason in self.REASONS}

    def refused(self, reason: str) -> None:
        self._refused[reason].increment(1)


class EngineMetrics:
    """The continuous-batching engine's (serving/engine.py): its batch per UNet call, its active
    requests, how long a request waits for its first step, cancellations."""

    def __init__(self, model: str):
        labels = {"model": model}
        family = pb_utils.MetricFamily
        self._families = {
            "rows": family("sdxl_engine_batch_rows", "UNet rows (samples) of each engine step", family.HISTOGRAM),
            "requests": family("sdxl_engine_batch_requests", "Requests sharing each engine step's UNet call", family.HISTOGRAM),
            "active": family("sdxl_engine_active_requests", "Requests in the engine (active and not yet admitted)", family.GAUGE),
            "wait": family("sdxl_engine_admission_wait_seconds", "Time from a request's arrival at the engine to its first step", family.HISTOGRAM),
            "cancel": family("sdxl_engine_cancellations_total", "Requests dropped by the engine because their caller cancelled", family.COUNTER),
            "samples": family(*UNET_SAMPLES, family.COUNTER),
        }
        self.rows = self._families["rows"].Metric(labels=labels, buckets=ROW_BUCKETS)
        self.requests = self._families["requests"].Metric(labels=labels, buckets=ROW_BUCKETS)
        self.active = self._families["active"].Metric(labels=labels)
        self.admission_wait = self._families["wait"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.cancellations = self._families["cancel"].Metric(labels=labels)
        self.unet_samples = self._families["samples"].Metric(labels=labels)

    def iteration(self, stats, engine_size: int) -> None:
        if stats.rows:
            self.rows.observe(stats.rows)
            self.requests.observe(stats.jobs)
        self.active.set(engine_size)


class StreamMetrics:
    """The streaming endpoint's: streams in flight, time to the first preview and to the final
    images, and cancellations with the time from seeing one to the denoiser dropping the request."""

    def __init__(self, model: str):
        labels = {"model": model}
        family = pb_utils.MetricFamily
        self._families = {
            "inflight": family("sdxl_stream_requests_in_flight", "Streams being denoised now", family.GAUGE),
            "first": family("sdxl_stream_first_preview_seconds", "Time from a stream's arrival to its first preview image", family.HISTOGRAM),
            "total": family("sdxl_stream_request_seconds", "Time from a stream's arrival to its final images", family.HISTOGRAM),
            "cancel": family("sdxl_stream_cancellations_total", "Streams cancelled by their client while denoising", family.COUNTER),
            "free": family("sdxl_stream_cancel_to_free_seconds", "Time from seeing a stream's cancellation to the denoiser dropping it (its batch slot free)", family.HISTOGRAM),
            "skipped": family("sdxl_stream_frames_skipped_total", "A session's frames answered as skipped: a newer frame arrived before they started", family.COUNTER),
        }
        self.in_flight = self._families["inflight"].Metric(labels=labels)
        self.first_preview = self._families["first"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.request_seconds = self._families["total"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.cancellations = self._families["cancel"].Metric(labels=labels)
        self.cancel_to_free = self._families["free"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.skipped = self._families["skipped"].Metric(labels=labels)
