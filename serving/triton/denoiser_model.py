"""`denoiser`: the continuous-batching engine (serving/engine.py) as a decoupled Triton model.

One instance (per GPU) holds every request handed to it, by the `scheduler` in its engine mode
(parameter engine: "denoiser") or by any BLS caller, and runs the UNet once per iteration for all
the active requests that can share a batch, admitting new ones between steps. Each request gets,
through its response sender: with `preview_every` k > 0, the latents after every k-th step (not
the last), then the final latents with the FINAL flag, or one error response. A request whose
caller cancels is dropped before its next step: a gRPC stream's cancellation, or, for a BLS caller
(which 2.51 cannot cancel), its `admission_ticket` marked cancelled in the run directory
(serving/admission.py RunState.cancel).

Config parameters: the recipe's (as the scheduler's: eta, recipe_scheduler...), cfg_end_fraction,
device, max_rows (the unet's max_batch_size: rows per UNet call).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from contract.networks import DENOISER, REFINER_UNET, UNET
from serving.admission import RunState, run_directory
from serving.endpoint import CHECKED_INPUTS, Cancelled, check_preview_every
from serving.engine import IterationStats, Job, StepEngine

from .common import error_response, input_arrays, traced
from .metrics import EngineMetrics
from .scheduler_model import LoopSettings, admission_ticket
from .settings import ModelSettings
from .tensors import call_controlnet, call_unet, to_torch, to_triton

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        settings = ModelSettings.from_args(args, DENOISER)
        self.settings = LoopSettings.load(settings)
        try:
            max_rows = int(settings.parameters.get("max_rows", ""))
        except ValueError:
            max_rows = 0
        if max_rows < 1:
            raise settings.error(f"parameter max_rows={settings.parameters.get('max_rows')!r}: expected the unet's "
                                 "max_batch_size (an integer of at least 1)")
        self.run = RunState(run_directory(os.getppid())).create()  # the stub's parent is tritonserver
        self.metrics = EngineMetrics(args["model_name"])
        self.engine = StepEngine(self._unet, max_rows, on_iteration=self._iteration_done, refiner=self._refiner,
                                 controlnet=self._controlnet)
        self.thread = threading.Thread(target=self._serve, name="denoiser-engine", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with torch.inference_mode():
            self.engine.serve_forever()

    def _unet(self, inputs: dict[str, torch.Tensor], network: str = UNET.name) -> torch.Tensor:
        noise = call_unet(inputs, self.settings.device, self.run, network)
        self.metrics.unet_samples.increment(inputs["sample"].shape[0])
        return noise

    def _refiner(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._unet(inputs, REFINER_UNET.name)

    def _controlnet(self, model: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return call_controlnet(model, inputs, self.settings.device, self.run)

    def _iteration_done(self, stats: IterationStats) -> None:
        self.metrics.iteration(stats, self.engine.size)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                with traced(request):  # its image encoded (vae_encoder, controls...) under its trace
                    job = self._job(request, sender)
                self.engine.submit(job)
            except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
                sender.send(error_response(error, "denoiser"), flags=FINAL)
        return None

    def _job(self, request, sender) -> Job:
        raw = input_arrays(request, (*CHECKED_INPUTS, "preview_every"))
        options = self.settings.check(raw)
        every = check_preview_every(raw["preview_every"], self.settings.limits)
        held = self.settings.held_loras(request)
        device = self.settings.device
        with torch.inference_mode():  # copies: the engine uses them after execute has returned
            embeds = to_torch(pb_utils.get_input_tensor_by_name(request, "prompt_embeds"), device, copy=True)
            pooled = to_torch(pb_utils.get_input_tensor_by_name(request, "pooled_prompt_embeds"), device, copy=True)
            init = self.settings.init_image(raw, options, self.run)  # the image encoded before the request joins
            denoiser = self.settings.denoiser(options, embeds, pooled, held, init, self.settings.request_controls(raw, options, self.run),
                                              self.settings.request_image_prompt(raw, options, self.run))
        seeds = np.asarray(options.seeds, dtype=np.int64)
        ticket = admission_ticket(request)  # a BLS caller's (sdxl_stream): it marks the ticket when its client cancels

        def cancelled() -> bool:
            return sender.is_cancelled() or (ticket is not None and self.run.is_cancelled(ticket))

        def send(latents: torch.Tensor, step: int, flags: int = 0) -> None:
            sender.send(pb_utils.InferenceResponse([
                to_triton("latents", latents), pb_utils.Tensor("seeds", seeds),
                pb_utils.Tensor("step", np.asarray([step], dtype=np.int32)),
            ]), flags=flags)

        def on_step(job: Job) -> None:
            if job.denoiser.steps_done == 1:
                self.metrics.admission_wait.observe(time.monotonic() - job.submitted)
            if every > 0 and job.denoiser.step_index % every == 0 and not job.denoiser.done:
                send(job.denoiser.latents, job.denoiser.step_index)

        def on_error(error: Exception) -> None:
            if isinstance(error, Cancelled):
                self.metrics.cancellations.increment(1)
            elif ticket is not None:  # its BLS caller cannot see the error: the log keeps it
                pb_utils.Logger.log_error(f"denoiser: request failed: {error}")
            # Measured on 2.51, for a decoupled BLS caller (those with a ticket): an error response never
            # reaches it, one sent with the FINAL flag left its response iterator waiting forever, and one
            # sent before the FINAL flag kept the caller's model from unloading (shutdown waited out its
            # exit timeout). So BLS callers get the FINAL flag alone; gRPC clients get the error, then FINAL.
            if ticket is None:
                sender.send(error_response(error, "denoiser"))
            sender.send(flags=FINAL)

        return Job(denoiser, on_done=lambda latents: send(latents, options.num_inference_steps, FINAL), on_error=on_error,
                   on_step=on_step, cancelled=cancelled)

    def finalize(self):
        self.engine.stop()
        self.thread.join(timeout=10)
