"""The scheduler's custom metrics, exported by Triton on its metrics port with the standard ones.

All instances of the scheduler share each metric (same name, same labels), so the figures are the
model's, not an instance's.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

# Seconds: 1 ms (a TensorRT UNet step at 512²) to 10 s (the CPU variant under load).
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
STEP_BUCKETS = [1, 2, 3, 4, 5, 6, 7, 8]


class SchedulerMetrics:
    def __init__(self, model: str):
        labels = {"model": model}
        family = pb_utils.MetricFamily
        # The families must outlive their metrics: keep both.
        self._families = {
            "latency": family("sdxl_unet_step_latency_seconds", "UNet call latency per denoising step, as the scheduler sees it (BLS round trip)", family.HISTOGRAM),
            "steps": family("sdxl_steps_per_request", "Denoising steps per request", family.HISTOGRAM),
            "samples": family("sdxl_unet_samples_total", "Latent samples sent through the UNet (CFG counts two per image)", family.COUNTER),
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
