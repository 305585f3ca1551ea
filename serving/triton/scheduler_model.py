"""`scheduler`: the denoising loop, calling `unet` through BLS at every step, with the diffusers
scheduler the export wrote (scheduler_config.json: its class and config; contract/recipes.py).

Config parameters: min_size, max_size, max_images (the endpoint's limits, see contract/limits.py),
the recipe (min_steps, max_steps, default_steps, default_guidance, eta, and what the model was made
from: recipe, recipe_model, recipe_loras, recipe_unet, recipe_vae, recipe_scheduler; written by the
export), device (cpu or cuda: where the loop's tensors live, the UNet's device), cfg_end_fraction
(CFG truncation, see serving.denoise; 1.0, off, by default), max_controlnets (3) and canny_thresholds
(100,200: the canny preprocessor's, serving/controlnets.py). A request that the tokenizer admitted
brings its admission ticket: the loop takes it off the queue on start (refusing the request if it
waited past its queue timeout) and frees it at the end (serving/admission.py).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from contract import layout
from contract.configs import exported_interface
from contract.controlnets import DEPTH
from contract.limits import Limits
from contract.networks import (DENOISER, DEPTH_ESTIMATOR, IMAGE_ENCODER, REFINER_UNET, SCHEDULER, UNET, UNET_CONTROL, UNET_IP,
                               VAE_ENCODER)
from contract.recipes import scheduler_kind
from serving.admission import TICKET_TENSOR, Refused, RunState, run_directory
from serving.denoise import Denoiser, InitImage, Refiner, RequestControls, cfg_end_fraction_from_parameters, denoise
from serving.controlnets import parse_canny_thresholds, preprocess
from serving.depth import DepthPreprocessor
from serving.endpoint import CHECKED_INPUTS, Cancelled, check_options
from serving.ip_adapters import ServedIPAdapter, image_prompt
from serving.loras import ServingLoras, check_request
from serving.schedulers import load_scheduler

from .common import (LORA_INPUTS, ComponentError, bls_request, control_tensors, error_response, image_tensors, infer,
                     input_arrays, ip_adapter_tensors, lora_tensors, option_tensors, respond, ticket_tensor, traced)
from .metrics import AdmissionMetrics, SchedulerMetrics
from .settings import ModelSettings
from .tensors import call_controlnet, call_network, call_unet, to_torch, to_triton



@dataclass
class LoopSettings:
    """What the denoising loop needs from a model's config parameters and the exported scheduler
    config: the scheduler's and the denoiser's alike."""

    limits: Limits
    cfg_end_fraction: float
    eta: float | None
    device: torch.device
    scheduler_class: type
    scheduler_config: dict
    loras: ServingLoras
    refiner_text_dim: int = 0  # the refiner's text conditioning width; 0: no refiner served
    controlnets: dict | None = None  # the ControlNets served: {name: contract.controlnets.ServedControl}
    # The UNet's LoRA input widths and control_width (lora_in, lora_out, control_width: contract.networks.ModelDims),
    # for the zeros unet_control and unet_ip take from a request without LoRAs or ControlNets; 0 where neither is served.
    unet_widths: tuple[int, int, int] = (0, 0, 0)
    canny_thresholds: tuple[int, int] = (100, 200)  # the canny preprocessor's (parameter canny_thresholds)
    depth: DepthPreprocessor | None = None  # the depth preprocessor, where a served ControlNet has it
    ip_adapter: ServedIPAdapter | None = None  # the IP-Adapter served; None: image prompts are refused

    @classmethod
    def load(cls, settings: ModelSettings) -> "LoopSettings":
        """TritonModelException, naming the model and the parameter, for a bad config."""
        params, limits = settings.parameters, settings.limits
        try:
            cfg_end_fraction = cfg_end_fraction_from_parameters(params)
            eta = eta_from_parameters(params)
        except ValueError as error:
            raise settings.error(str(error)) from None
        device = settings.choice("device", "cpu", ("cpu", "cuda"))
        if device == "cuda":
            device = f"cuda:{settings.device_id}"
        config_path = layout.scheduler_config_path(settings.repository)
        if not config_path.exists():
            raise settings.error(f"no {config_path}; run `python -m export onnx` (or `make export-tiny`) first")
        try:
            scheduler_class, config = scheduler_config(settings.repository, params.get("recipe_scheduler"))
        except ValueError as error:
            raise settings.error(f"{config_path}: {error}") from None
        settings.check_graph_interface(exported_interface(settings.repository, settings.model))  # as export.json recorded it
        loras = settings.loras
        refiner_text_dim = 0
        if limits.has_refiner:
            if not exported_interface(settings.repository, REFINER_UNET.name):
                raise settings.error(
                    f"recipe {limits.recipe} has a refiner (parameter high_noise_frac={limits.default_high_noise_frac:g}), "
                    f"but the repository has no {REFINER_UNET.name} graph; export with --refiner (or --preset sdxl-base-refiner)")
            refiner_text_dim = settings.export[1].refiner_text_dim
        controlnets = settings.controlnets
        try:
            canny_thresholds = parse_canny_thresholds(params.get("canny_thresholds", "100,200"))
        except ValueError as error:
            raise settings.error(str(error)) from None
        if controlnets:
            if not exported_interface(settings.repository, UNET_CONTROL.name):
                raise settings.error(f"the repository serves ControlNets ({', '.join(controlnets)}) but no {UNET_CONTROL.name} "
                                     "graph; export them together (python -m export onnx --controlnet NAME=PATH)")
        # Where a served ControlNet (or union mode) has the depth preprocessor: served_controlnets says so only
        # where the repository holds the depth estimator.
        depth = DepthPreprocessor(settings.repository) if any(c.preprocessor == DEPTH for c in (controlnets or {}).values()) else None
        ip_adapter = settings.ip_adapter
        if ip_adapter is not None and not exported_interface(settings.repository, UNET_IP.name):
            raise settings.error(f"the repository serves an IP-Adapter ({IMAGE_ENCODER.name}) but no {UNET_IP.name} graph; "
                                 "export them together (python -m export onnx --ip-adapter FILE --image-encoder DIR)")
        unet_widths = (0, 0, 0)
        if controlnets or ip_adapter is not None:
            dims = settings.export[1]
            unet_widths = (dims.unet_lora_in, dims.unet_lora_out, dims.control_width)
        return cls(limits, cfg_end_fraction, eta, torch.device(device), scheduler_class, config, loras, refiner_text_dim,
                   controlnets, unet_widths, canny_thresholds, depth, ip_adapter)

    def check(self, raw: dict):
        """The request's options (serving.endpoint.check_options) against the limits, the ControlNets and the
        IP-Adapter served."""
        return check_options(raw, self.limits, controlnets=self.controlnets, ip_adapter=self.ip_adapter)

    def request_image_prompt(self, raw: dict, options, run):
        """The request's image prompt (serving.ip_adapters.ImagePrompt), its image encoded by `image_encoder`
        (BLS, once per request); None without one or at scale 0."""
        def encode(pixel_values):
            response = infer(IMAGE_ENCODER.name, [pb_utils.Tensor("pixel_values", pixel_values)], IMAGE_ENCODER.output_names, run)
            return tuple(to_torch(pb_utils.get_output_tensor_by_name(response, name), self.device, copy=True)
                         for name in IMAGE_ENCODER.output_names)

        return image_prompt(options.image_prompt, raw.get("ip_adapter_image"), self.ip_adapter, encode, self.device, self.unet_widths)

    def request_controls(self, raw: dict, options, run) -> RequestControls | None:
        """The request's ControlNets with their control maps on the loop's device (made by the ControlNet's
        preprocessor where the request asks for it: canny here, depth with the depth_estimator, BLS);
        None without any."""
        if not options.controls:
            return None
        maps = []
        for spec in options.controls:
            image = np.asarray(raw["control_images"][spec.index])
            if spec.preprocess:
                kind = self.controlnets[spec.name].preprocessor
                if kind == DEPTH:
                    image = self.depth(image, lambda pixel_values: call_network(
                        DEPTH_ESTIMATOR, DEPTH_ESTIMATOR.name, {"pixel_values": pixel_values}, torch.device("cpu"), run))
                else:
                    image = preprocess(kind, image, self.canny_thresholds)
            maps.append(torch.from_numpy(np.array(image, dtype=np.uint8)[None]).to(self.device))  # a copy: the request's memory goes
        return RequestControls(options.controls, tuple(maps), self.unet_widths[:2])

    def held_loras(self, request) -> list:
        """The request's LoRAs (lora_names, lora_scales), checked and read: LoraError naming the input."""
        raw = input_arrays(request, LORA_INPUTS)
        named = check_request(raw["lora_names"], raw["lora_scales"], self.limits.max_loras, self.limits.max_lora_scale)
        return self.loras.load(named)

    def init_image(self, raw: dict, options, run) -> InitImage | None:
        """An img2img or inpainting request's image encoded by `vae_encoder` (BLS), and its mask;
        None for text-to-image. `raw`: the request's checked inputs (check_options read them)."""
        if options.strength is None:
            return None
        response = infer(VAE_ENCODER.name, [pb_utils.Tensor("images", np.ascontiguousarray(raw["image"])[None])],
                         VAE_ENCODER.output_names, run)
        mean, std = (to_torch(pb_utils.get_output_tensor_by_name(response, name), self.device, copy=True)
                     for name in VAE_ENCODER.output_names)
        mask = None
        if options.inpainting:  # binarized as diffusers' mask processor does: value / 255 >= 0.5
            mask = torch.from_numpy((raw["mask"] >= 128).astype(np.float32))[None, None].to(self.device)
        return InitImage(mean, std, options.strength, mask)

    @cached_property
    def _scheduler(self):
        return self.scheduler_class.from_config(self.scheduler_config)

    def fresh_scheduler(self):
        """A new scheduler of the recipe's class and config, for one request (it keeps per-request state):
        a copy of one made once, since from_config inspects the class's signature on every call."""
        return copy.deepcopy(self._scheduler)

    def denoiser(self, options, embeds: torch.Tensor, pooled: torch.Tensor, held: list, init: InitImage | None = None,
                 controls: RequestControls | None = None, prompt=None) -> Denoiser:
        """`prompt`: the request's image prompt (request_image_prompt)."""
        lora = {name: torch.from_numpy(value).to(self.device)  # none: the plain unet, which pays nothing for LoRAs
                for name, value in self.loras.tensors(UNET.name, held, 1).items()} if held else None
        refiner = None
        if options.high_noise_frac is not None:  # a fresh scheduler of the same class and config, as the refiner pipeline's
            refiner = Refiner(self.fresh_scheduler(), options.high_noise_frac, self.refiner_text_dim)
        return Denoiser(options, embeds, pooled, self.fresh_scheduler(),
                        cfg_end_fraction=self.cfg_end_fraction, eta=self.eta, lora=lora, init=init, refiner=refiner,
                        controls=controls, image_prompt=prompt)


class TritonPythonModel:
    def initialize(self, args):
        settings = ModelSettings.from_args(args, SCHEDULER)
        self.settings = LoopSettings.load(settings)
        self.limits, self.device = self.settings.limits, self.settings.device
        # "": the loop runs here; "denoiser": the continuous-batching engine runs it (one request per
        # instance either way: the instances are the requests in flight).
        self.engine = settings.parameters.get("engine", "")
        if self.engine not in ("", DENOISER):
            raise settings.error(f"parameter engine={self.engine!r}: expected empty (the loop in this model) or "
                                 f"{DENOISER!r} (the continuous-batching engine)")
        self.run = RunState(run_directory(os.getppid())).create()  # the stub's parent is tritonserver
        self.run.register_loop()
        self.metrics = SchedulerMetrics(args["model_name"])
        self.admission_metrics = AdmissionMetrics(args["model_name"])

    def execute(self, requests):
        responses = []
        for request in requests:
            with traced(request):
                responses.append(self._respond(request))
        return responses

    def _loop_latents(self, request, raw, options):
        held = self.settings.held_loras(request)  # read once; held to the end, even if removed meanwhile
        embeds = to_torch(pb_utils.get_input_tensor_by_name(request, "prompt_embeds"), self.device)
        pooled = to_torch(pb_utils.get_input_tensor_by_name(request, "pooled_prompt_embeds"), self.device)
        with torch.inference_mode():
            init = self.settings.init_image(raw, options, self.run)
            denoiser = self.settings.denoiser(options, embeds, pooled, held, init, self.settings.request_controls(raw, options, self.run),
                                              self.settings.request_image_prompt(raw, options, self.run))
            latents = denoise(self._unet, denoiser, cancelled=request.is_cancelled, refiner=self._refiner,
                              controlnet=self._controlnet)
        return to_triton("latents", latents)

    def _engine_latents(self, request, raw, options):
        embeddings = [pb_utils.get_input_tensor_by_name(request, name) for name in ("prompt_embeds", "pooled_prompt_embeds")]
        return engine_latents(self.engine, embeddings + lora_tensors(request) + image_tensors(request) + control_tensors(request)
                              + ip_adapter_tensors(request),
                              options, request, self.run, admission_ticket(request))

    def _unet(self, inputs: dict[str, torch.Tensor], network: str = UNET.name) -> torch.Tensor:
        start = time.perf_counter()
        noise = call_unet(inputs, self.device, self.run, network)
        self.metrics.unet_step(time.perf_counter() - start, inputs["sample"].shape[0])
        return noise

    def _refiner(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._unet(inputs, REFINER_UNET.name)

    def _controlnet(self, model: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return call_controlnet(model, inputs, self.device, self.run)

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
            raw = input_arrays(request, CHECKED_INPUTS)
            options = self.settings.check(raw)
            self._start(ticket)
            self.metrics.in_flight.increment(1)
            try:
                latents = self._engine_latents(request, raw, options) if self.engine else self._loop_latents(request, raw, options)
            finally:
                self.metrics.in_flight.increment(-1)
            self.metrics.steps_per_request.observe(options.denoising_steps)
            return respond(request, {"latents": latents,
                                     "seeds": np.asarray(options.seeds, dtype=np.int64)})
        except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
            return error_response(error, "scheduler")
        finally:
            if ticket is not None:
                self.run.finish(ticket)  # whatever happened: its queue place or loop slot is free


def scheduler_config(repository, expected_class: str | None) -> tuple[type, dict]:
    """The exported scheduler's class (one of the recipes', contract/recipes.py) and its config, less
    the keys that class does not take. `expected_class`: the recipe_scheduler parameter the export
    wrote beside it."""
    class_name = layout.scheduler_class(repository) or "LCMScheduler"
    scheduler_kind(class_name)  # ValueError naming the supported classes
    if expected_class and expected_class != class_name:
        raise ValueError(f"holds a {class_name}, but the config's recipe_scheduler parameter says {expected_class}: the "
                         "configs and the export disagree; run `python -m export configs --repository REPOSITORY`")
    return load_scheduler(layout.scheduler_config_path(repository).parent, class_name)


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


def engine_latents(engine: str, embeddings: list, options, request, run, ticket: str | None):
    """Hand one checked request to the engine model (decoupled BLS) and return its final latents,
    a Triton tensor passed on as it came. With the request's admission ticket, the engine treats it
    as a BLS caller's: its failure ends the responses without latents (and is in the server log)."""
    inputs = list(embeddings) + option_tensors(options, request)
    if ticket is not None:
        inputs.append(ticket_tensor(ticket))
    responses = bls_request(engine, inputs, ["latents"]).exec(decoupled=True)
    latents = None
    for response in responses:
        if response.has_error():
            message = response.error().message()
            run.report_unhealthy(message)
            if response.error().code() == pb_utils.TritonError.CANCELLED:
                raise Cancelled(message)
            raise ComponentError(f"{engine}: {message}")
        tensor = pb_utils.get_output_tensor_by_name(response, "latents")
        if tensor is not None:
            latents = tensor  # the last one is the final latents (earlier ones: previews)
    if latents is None:  # 2.51 drops a decoupled callee's error responses: the engine logs the error
        raise ComponentError(f"{engine}: the request ended without its final latents (the error is in the server log)")
    return latents


def admission_ticket(request) -> str | None:
    """The tokenizer's ticket; None without one (the scheduler called directly) or for anything else."""
    tensor = pb_utils.get_input_tensor_by_name(request, TICKET_TENSOR)
    if tensor is None or tensor.as_numpy().size != 1:
        return None
    ticket = bytes(tensor.as_numpy().reshape(-1)[0]).decode("ascii", "replace")
    return ticket if RunState.is_ticket(ticket) else None
