"""Continuous batching of denoising steps: one engine holds every admitted request's loop (a
`Denoiser`) and, at each iteration, runs the UNet once for the active requests that can share a
batch, admitting new requests between steps and retiring finished ones.

Which requests share a UNet call: those at a step of the same network (the UNet, or the refiner's
for the requests past their hand-off) whose latents have the same shape and dtype (same height and
width); any step, any scheduler state, CFG or not, 1 to 4 images: the UNet takes one timestep per
sample, and each request's rows are its own (conditioning, time ids, LoRA weights, ControlNet
residuals: rows without send zeros). A call holds at most `max_rows` rows (the UNet's max batch
size). Before it, each ControlNet that requests of the batch run at their step is called once for
all their rows (serving/denoise.py controlled_unet_inputs).

Fairness (no starvation): every active request has the iteration since which it is ready for its
next step (the one after its last step, or its admission). Each iteration serves the shape group
holding the request ready longest, and, inside it, takes requests in the order they became ready
until `max_rows` is full. A request that became ready at iteration k waits only for the requests
that were ready before it, never for later arrivals: a long request is not starved by a stream of
short ones, nor a rare size by a common one.

Thread model: `submit` and `cancel` from any thread (Triton's execute); `run_iteration` from the
engine's one thread (`serve_forever`). Callbacks run on the engine thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .denoise import ControlNetFn, Denoiser, UNetFn, concat_unet_inputs, controlled_unet_inputs, network_fn
from .endpoint import Cancelled


@dataclass(eq=False)
class Job:
    """One request inside the engine."""

    denoiser: Denoiser
    on_done: Callable[[torch.Tensor], None]  # the final latents
    on_error: Callable[[Exception], None]
    on_step: Callable[["Job"], None] | None = None  # after each step (previews, progress)
    cancelled: Callable[[], bool] = lambda: False
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.monotonic)
    last_served: int = -1  # the iteration that last stepped it
    ready_at: int = 0  # the iteration since which it waits for its next step

    @property
    def key(self) -> tuple:
        latents = self.denoiser.latents
        return self.denoiser.network, tuple(latents.shape[1:]), latents.dtype, latents.device

    @property
    def rows(self) -> int:
        return self.denoiser.unet_batch


@dataclass
class IterationStats:
    """What one iteration's UNet call held (for metrics): rows and requests, 0 when it made none."""

    rows: int = 0
    jobs: int = 0


class StepEngine:
    """See the module docstring. `unet(inputs) -> noise_pred` runs one UNet call (inputs named as
    contract.networks.UNET's, rows concatenated); `refiner` one refiner_unet call, where requests
    have a refiner; `controlnet(model, inputs) -> control_residuals` one ControlNet call, for the
    rows of every request of the batch that runs that ControlNet at its step."""

    def __init__(self, unet: UNetFn, max_rows: int, on_iteration: Callable[[IterationStats], None] | None = None,
                 refiner: UNetFn | None = None, controlnet: ControlNetFn | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows {max_rows}: expected at least 1")
        self.unet, self.refiner, self.max_rows, self.on_iteration = unet, refiner, max_rows, on_iteration
        self.controlnet = controlnet
        self.iteration = 0
        self.active: list[Job] = []
        self._incoming: deque[Job] = deque()
        self._lock = threading.Condition()
        self._stopping = False

    # -- any thread --------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        if job.rows > self.max_rows:
            raise ValueError(f"{job.rows} UNet rows in one request; the UNet takes at most {self.max_rows} (max_batch_size)")
        with self._lock:
            self._incoming.append(job)
            self._lock.notify()
        return job

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()

    @property
    def size(self) -> int:
        """Requests in the engine: active and not yet admitted."""
        with self._lock:
            return len(self.active) + len(self._incoming)

    # -- the engine thread -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Iterate while there is work; sleep while there is none; return after stop()."""
        while True:
            with self._lock:
                while not self._incoming and not self.active and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    stranded = [*self._incoming, *self.active]
                    self._incoming.clear()
                    self.active.clear()
                    break
            self.run_iteration()
        for job in stranded:
            job.on_error(Cancelled("the server is shutting down"))

    def run_iteration(self) -> IterationStats:
        """Admit, retire cancelled requests, step one batch, retire finished ones."""
        stats = IterationStats()
        self._admit()
        self._retire_cancelled()
        batch = self._choose()
        if batch:
            self._step(batch, stats)
        self.iteration += 1
        if self.on_iteration is not None:
            self.on_iteration(stats)
        return stats

    def _admit(self) -> None:
        with self._lock:
            while self._incoming:
                job = self._incoming.popleft()
                job.ready_at = self.iteration
                self.active.append(job)

    def _retire_cancelled(self) -> None:
        for job in list(self.active):
            try:
                stop = job.cancelled()
            except Exception:  # noqa: BLE001 - a failing check must not stop the engine
                stop = True
            if stop:
                self.active.remove(job)
                job.on_error(Cancelled(f"cancelled before denoising step {job.denoiser.step_index + 1} of "
                                       f"{len(job.denoiser.timesteps)}"))

    def _choose(self) -> list[Job]:
        """The group of the request ready longest, its requests in the order they became ready, up
        to max_rows rows."""
        if not self.active:
            return []
        groups: dict[tuple, list[Job]] = {}
        for job in self.active:
            groups.setdefault(job.key, []).append(job)
        order = lambda job: (job.ready_at, job.submitted, job.id)  # noqa: E731 - ties: first come
        group = min(groups.values(), key=lambda jobs: min(map(order, jobs)))
        batch, rows = [], 0
        for job in sorted(group, key=order):
            if rows + job.rows <= self.max_rows:
                batch.append(job)
                rows += job.rows
        return batch

    def _step(self, batch: list[Job], stats: IterationStats) -> None:
        stats.rows, stats.jobs = sum(job.rows for job in batch), len(batch)
        try:
            inputs = controlled_unet_inputs([job.denoiser for job in batch], self.controlnet, self.max_rows)
            feed = concat_unet_inputs(inputs)
            noise = network_fn(self.unet, self.refiner, batch[0].denoiser.network)(feed)
        except Exception as error:  # noqa: BLE001 - a network's failure fails these requests, not the engine
            for job in batch:
                self.active.remove(job)
                job.on_error(error)
            return
        start = 0
        for job, given in zip(batch, inputs):
            rows = given["sample"].shape[0]
            part, start = noise[start:start + rows], start + rows
            try:
                job.denoiser.step(part)
                job.last_served, job.ready_at = self.iteration, self.iteration + 1
                if job.on_step is not None:
                    job.on_step(job)
            except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
                self.active.remove(job)
                job.on_error(error)
                continue
            if job.denoiser.done:
                self.active.remove(job)
                job.on_done(job.denoiser.latents)
