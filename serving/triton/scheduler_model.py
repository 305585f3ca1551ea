"""`scheduler`: the LCM denoising loop, calling `unet` through BLS at every step.

Config parameters: min_size, max_size, max_images (the endpoint's limits, see contract/limits.py),
device (cpu or cuda: where the loop's tensors live, the UNet's device), cfg_end_fraction (CFG
truncation, see serving.denoise; 1.0, off, by default). A request that the tokenizer admitted
brings its admission ticket: the loop takes it off the queue on start (refusing the request if it
waited past its queue timeout) and frees it at the end (serving/admission.py).
"""

from __future__ import annotations

import inspect
import os
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from diffusers import LCMScheduler

from contract import layout
from contract.configs import exported_interface
from contract.limits import Limits
from contract.networks import SCHEDULER, UNET
from serving.admission import TICKET_TENSOR, Refused, RunState, run_directory
from serving.denoise import LcmDenoiser, cfg_end_fraction_from_parameters, denoise
from serving.endpoint import check_options

from .common import (check_graph_interface, error_response, infer, input_arrays, model_config, parameters, repository_root,
                     respond, version_dir)
from .metrics import AdmissionMetrics, SchedulerMetrics

OPTION_INPUTS = ("seed", "num_inference_steps", "guidance_scale", "height", "width", "num_images_per_prompt")


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(model_config(args))
        try:
            self.limits = Limits.from_parameters(params)
            self.cfg_end_fraction = cfg_end_fraction_from_parameters(params)
        except ValueError as error:
            raise pb_utils.TritonModelException(f"scheduler: {error}") from None
        device = params.get("device", "cpu")
        if device not in ("cpu", "cuda"):
            raise pb_utils.TritonModelException(f"scheduler: parameter device={device!r}: expected cpu or cuda")
        if device == "cuda":
            device = f"cuda:{args['model_instance_device_id']}"
        self.device = torch.device(device)
        config_path = version_dir(args) / layout.SCHEDULER_CONFIG_FILE
        if not config_path.exists():
            raise pb_utils.TritonModelException(
                f"scheduler: no {config_path}; run `python -m export onnx` (or `make export-tiny`) first"
            )
        self.scheduler_config = scheduler_config(config_path.parent)
        check_graph_interface(args, SCHEDULER, exported_interface(repository_root(args), SCHEDULER))  # as export.json recorded it
        self.run = RunState(run_directory(os.getppid())).create()  # the stub's parent is tritonserver
        self.run.register_loop()
        self.metrics = SchedulerMetrics(args["model_name"])
        self.admission_metrics = AdmissionMetrics(args["model_name"])

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _unet(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        tensors = []
        for tensor in UNET.inputs:
            value = inputs[tensor.name]
            # timestep is [B] in the graph; Triton's config gives it dims [1] with reshape [].
            tensors.append(to_triton(tensor.name, value.reshape(-1, 1) if tensor.name == "timestep" else value))
        start = time.perf_counter()
        response = infer(UNET.name, tensors, UNET.output_names, self.run)
        self.metrics.unet_step(time.perf_counter() - start, inputs["sample"].shape[0])
        return to_torch(pb_utils.get_output_tensor_by_name(response, "noise_pred"), self.device)

    def _start(self, ticket: str | None) -> None:
        """Take the admission ticket off the queue (None: called without the tokenizer, e.g. directly)."""
        if ticket is None:
            return
        try:
            self.metrics.queue_wait.observe(self.run.start(ticket))
        except Refused as refusal:
            self.admission_metrics.refused(refusal.reason)
            raise

    def _respond(self, request):
        ticket = admission_ticket(request)
        try:
            options = check_options(input_arrays(request, OPTION_INPUTS), self.limits)
            self._start(ticket)
            embeds = to_torch(pb_utils.get_input_tensor_by_name(request, "prompt_embeds"), self.device)
            pooled = to_torch(pb_utils.get_input_tensor_by_name(request, "pooled_prompt_embeds"), self.device)
            scheduler = LCMScheduler.from_config(self.scheduler_config)
            self.metrics.in_flight.increment(1)
            try:
                with torch.inference_mode():
                    denoiser = LcmDenoiser(options, embeds, pooled, scheduler, cfg_end_fraction=self.cfg_end_fraction)
                    latents = denoise(self._unet, denoiser, cancelled=request.is_cancelled)
            finally:
                self.metrics.in_flight.increment(-1)
            self.metrics.steps_per_request.observe(options.num_inference_steps)
            return respond(request, {"latents": to_triton("latents", latents),
                                     "seeds": np.asarray(options.seeds, dtype=np.int64)})
        except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
            return error_response(error, "scheduler")
        finally:
            if ticket is not None:
                self.run.finish(ticket)  # whatever happened: its queue place or loop slot is free


def to_torch(tensor, device: torch.device) -> torch.Tensor:
    """A Triton tensor as a torch tensor on `device`; GPU memory is shared through DLPack, not copied."""
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy()).to(device)
    return torch.from_dlpack(tensor.to_dlpack()).to(device)


def to_triton(name: str, value: torch.Tensor):
    if value.is_cuda:
        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
    return pb_utils.Tensor(name, value.contiguous().numpy())


def scheduler_config(directory) -> dict:
    """The exported scheduler_config.json without the keys LCMScheduler does not take (diffusers
    would warn about them on every request)."""
    config = LCMScheduler.load_config(directory)
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    return {key: value for key, value in config.items() if key in accepted}


def admission_ticket(request) -> str | None:
    """The tokenizer's ticket; None without one (the scheduler called directly) or for anything else."""
    tensor = pb_utils.get_input_tensor_by_name(request, TICKET_TENSOR)
    if tensor is None or tensor.as_numpy().size != 1:
        return None
    ticket = bytes(tensor.as_numpy().reshape(-1)[0]).decode("ascii", "replace")
    return ticket if RunState.is_ticket(ticket) else None
