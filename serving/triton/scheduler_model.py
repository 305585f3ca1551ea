"""`scheduler`: the LCM denoising loop, calling `unet` through BLS at every step.

Config parameters: min_size, max_size, max_images (the endpoint's limits, see serving.endpoint.Limits),
device (cpu or cuda: where the loop's tensors live, the UNet's device), cfg_end_fraction (CFG
truncation, see serving.denoise; 1.0, off, by default).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from diffusers import LCMScheduler

from contract import layout
from contract.configs import exported_interface
from contract.limits import Limits
from contract.networks import SCHEDULER, UNET
from serving.denoise import LcmDenoiser, cfg_end_fraction_from_parameters, denoise
from serving.endpoint import check_options

from .common import (check_graph_interface, error_response, infer, input_arrays, model_config, parameters, repository_root,
                     to_torch, to_triton, version_dir)
from .metrics import SchedulerMetrics

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
        self.scheduler_config = LCMScheduler.load_config(config_path.parent)
        check_graph_interface(args, SCHEDULER, exported_interface(repository_root(args), SCHEDULER))  # as export.json recorded it
        self.metrics = SchedulerMetrics(args["model_name"])

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _unet(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        tensors = []
        for tensor in UNET.inputs:
            value = inputs[tensor.name]
            # timestep is [B] in the graph; Triton's config gives it dims [1] with reshape [].
            tensors.append(to_triton(tensor.name, value.reshape(-1, 1) if tensor.name == "timestep" else value))
        start = time.perf_counter()
        response = infer(UNET.name, tensors, UNET.output_names)
        self.metrics.unet_step(time.perf_counter() - start, inputs["sample"].shape[0])
        return to_torch(pb_utils.get_output_tensor_by_name(response, "noise_pred"), self.device)

    def _respond(self, request):
        try:
            options = check_options(input_arrays(request, OPTION_INPUTS), self.limits)
            embeds = to_torch(pb_utils.get_input_tensor_by_name(request, "prompt_embeds"), self.device)
            pooled = to_torch(pb_utils.get_input_tensor_by_name(request, "pooled_prompt_embeds"), self.device)
            scheduler = LCMScheduler.from_config(self.scheduler_config)
            self.metrics.in_flight.increment(1)
            try:
                with torch.inference_mode():
                    denoiser = LcmDenoiser(options, embeds, pooled, scheduler, cfg_end_fraction=self.cfg_end_fraction)
                    latents = denoise(self._unet, denoiser)
            finally:
                self.metrics.in_flight.increment(-1)
            self.metrics.steps_per_request.observe(options.num_inference_steps)
            seeds = np.asarray(options.seeds, dtype=np.int64)
            return pb_utils.InferenceResponse([to_triton("latents", latents), pb_utils.Tensor("seeds", seeds)])
        except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
            return error_response(error, "scheduler")
