"""`scheduler`: the denoising loop, calling `unet` through BLS at every step, with the diffusers
scheduler the export wrote (scheduler_config.json: its class and config; contract/recipes.py).

Config parameters: min_size, max_size, max_images (the endpoint's limits, see contract/limits.py),
the recipe (min_steps, max_steps, default_steps, default_guidance, eta, and what the model was made
from: recipe, recipe_model, recipe_loras, recipe_unet, recipe_vae, recipe_scheduler; written by the
export), device (cpu or cuda: where the loop's tensors live, the UNet's device), cfg_end_fraction
(CFG truncation, see serving.denoise; 1.0, off, by default). A request that the tokenizer admitted
brings its admission ticket: the loop takes it off the queue on start (refusing the request if it
waited past its queue timeout) and frees it at the end (serving/admission.py).
"""

from __future__ import annotations

import inspect
import os
import time

import diffusers
import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from contract import layout
from contract.configs import exported_interface
from contract.limits import Limits
from contract.networks import SCHEDULER, UNET
from contract.recipes import scheduler_kind
from serving.admission import TICKET_TENSOR, Refused, RunState, run_directory
from serving.denoise import Denoiser, cfg_end_fraction_from_parameters, denoise
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
            self.eta = eta_from_parameters(params)
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
        try:
            self.scheduler_class, self.scheduler_config = scheduler_config(config_path.parent, params.get("recipe_scheduler"))
        except ValueError as error:
            raise pb_utils.TritonModelException(f"scheduler: {config_path}: {error}") from None
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
            scheduler = self.scheduler_class.from_config(self.scheduler_config)
            self.metrics.in_flight.increment(1)
            try:
                with torch.inference_mode():
                    denoiser = Denoiser(options, embeds, pooled, scheduler, cfg_end_fraction=self.cfg_end_fraction,
                                        eta=self.eta)
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


def scheduler_config(directory, expected_class: str | None) -> tuple[type, dict]:
    """The exported scheduler's class (one of the recipes', contract/recipes.py) and its config, less
    the keys that class does not take (diffusers would warn about them on every request).
    `expected_class`: the recipe_scheduler parameter the export wrote beside it."""
    config = diffusers.LCMScheduler.load_config(directory)
    class_name = config.get("_class_name", "LCMScheduler")
    scheduler_kind(class_name)  # ValueError naming the supported classes
    if expected_class and expected_class != class_name:
        raise ValueError(f"holds a {class_name}, but the config's recipe_scheduler parameter says {expected_class}: the "
                         "configs and the export disagree; run `python -m export configs --repository REPOSITORY`")
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls, {key: value for key, value in config.items() if key in accepted}


def eta_from_parameters(parameters: dict[str, str]) -> float | None:
    """The recipe's eta (TCD's gamma, DDIM's eta); None (empty or absent): the pipeline's default 0.0."""
    text = parameters.get("eta", "")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"model config parameter eta={text!r}: expected empty or a number from 0 to 1")
    return value


def admission_ticket(request) -> str | None:
    """The tokenizer's ticket; None without one (the scheduler called directly) or for anything else."""
    tensor = pb_utils.get_input_tensor_by_name(request, TICKET_TENSOR)
    if tensor is None or tensor.as_numpy().size != 1:
        return None
    ticket = bytes(tensor.as_numpy().reshape(-1)[0]).decode("ascii", "replace")
    return ticket if RunState.is_ticket(ticket) else None
