"""Helpers shared by the Python-backend models: tensors, BLS, error responses, the endpoint's finisher
(what each model reads at load: settings.py). No torch here: only the scheduler needs it, and each
model process that imports it pays about 2 s of CPU and 200 MB at every (re)start."""

from __future__ import annotations

import json
import traceback
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.admission import Refused
from serving.endpoint import (CONTROL_INPUT_NAMES, IMAGE_INPUT_NAMES, INPUTS, IP_ADAPTER_INPUT_NAMES, OPTION_INPUTS, Cancelled,
                              InvalidInput)
from serving.endpoint import LORA_INPUTS as endpoint_lora_inputs
from contract.loras import LoraError


class ComponentError(RuntimeError):
    """A BLS call failed; the request fails with the component's message. `callee_error`: the
    callee's own TritonError, for a caller that passes it on as it came (sdxl_stream)."""

    def __init__(self, message: str, callee_error=None):
        super().__init__(message)
        self.callee_error = callee_error


def input_arrays(request, names) -> dict[str, np.ndarray | None]:
    """CPU numpy arrays of the named inputs; None for an omitted optional input."""
    arrays = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        arrays[name] = None if tensor is None else tensor.as_numpy()
    return arrays


_REQUEST_TRACE: ContextVar = ContextVar("request_trace", default=None)


@contextmanager
def traced(request):
    """While `request` is handled: the BLS calls made for it in this thread carry its Triton trace, so a
    traced request (tritonserver's trace settings; docs/serving.md, "Tracing a request") shows its callees
    under it. Calls from other threads (the denoiser's engine: one UNet call for several requests) are not
    traced."""
    token = _REQUEST_TRACE.set(request.trace())
    try:
        yield
    finally:
        _REQUEST_TRACE.reset(token)


def bls_request(model: str, inputs: list, outputs: list[str], **options):
    """A BLS request to `model`, carrying the trace of the request being handled (traced)."""
    trace = _REQUEST_TRACE.get()
    if trace is not None:
        options["trace"] = trace
    return pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs, **options)


def infer(model: str, inputs: list, outputs: list[str], run=None, parameters: dict | None = None):
    """One BLS call, its error raised as ComponentError naming the model. A callee whose process
    Triton calls "not healthy" is reported to the supervisor through `run` (a RunState).
    `parameters`: request parameters to pass on (a client's queue_timeout_ms)."""
    extra = {"parameters": parameters} if parameters else {}
    response = bls_request(model, inputs, outputs, **extra).exec()
    if response.has_error():
        message = response.error().message()
        if run is not None:
            run.report_unhealthy(message)
        raise ComponentError(f"{model}: {message}", response.error())
    return response


def request_parameters(request) -> dict:
    """The request's parameters (Triton hands them over as JSON text); bad ones are the client's error."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidInput("parameters", type(error).__name__, "request parameters in UTF-8") from None
    return parameters if isinstance(parameters, dict) else {}


def respond(request, tensors: dict):
    """A response with the outputs the request asked for, no others: Triton 2.51 frees unrequested
    outputs without the GIL, and each one costs shared memory (DESIGN.md)."""
    wanted = request.requested_output_names()
    return pb_utils.InferenceResponse([
        value if isinstance(value, pb_utils.Tensor) else pb_utils.Tensor(name, value)
        for name, value in tensors.items() if name in wanted
    ])


def error_response(error: Exception, model: str):
    """INVALID_ARG for bad input, UNAVAILABLE for a refusal (retry later), CANCELLED for a cancelled
    request, the component's message for a failed BLS call, INTERNAL otherwise."""
    if isinstance(error, (InvalidInput, LoraError)):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
    if isinstance(error, Refused):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.UNAVAILABLE))
    if isinstance(error, Cancelled):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.CANCELLED))
    if isinstance(error, ComponentError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
    pb_utils.Logger.log_error(f"{model}: {traceback.format_exc()}")
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{model}: internal error: {type(error).__name__}: {error}"))


def endpoint_finisher(settings, run=None):
    """The endpoint's serving.outputs.Finisher as its config parameters (or the environment) set it:
    the deployment's watermark, and its safety checker, whose graph runs through BLS. A bad setting or
    a checker's missing files raise ValueError: the model's load fails."""
    from contract.layout import version_dir as model_version_dir
    from contract.networks import SAFETY_CHECKER
    from serving.outputs import Finisher, parse_safety_setting, parse_watermark_setting
    from serving.safety import SafetyChecker

    watermark = parse_watermark_setting(settings.parameters.get("apply_watermark", ""), settings.model)
    policy = parse_safety_setting(settings.parameters.get("safety_checker", ""), settings.model)
    if policy == "off":
        return Finisher(watermark)

    def distances(pixel_values: np.ndarray) -> tuple:
        response = infer(SAFETY_CHECKER.name, [pb_utils.Tensor("pixel_values", pixel_values)], SAFETY_CHECKER.output_names, run)
        return tuple(pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in SAFETY_CHECKER.output_names)

    checker = SafetyChecker(model_version_dir(settings.repository, SAFETY_CHECKER.name), policy)
    return Finisher(watermark, checker, distances)


def option_tensors(options, request) -> list:
    """A checked request's options (serving.endpoint.GenerationOptions) as Triton tensors, in the
    endpoint's dtypes, its high_noise_frac where a refiner is served, and its negative prompt as it
    came (the loop tells an empty one from a given one): what a BLS caller hands the denoiser."""
    dtypes = {i.name: pb_utils.triton_string_to_numpy("TYPE_" + i.dtype) for i in INPUTS}
    tensors = [pb_utils.Tensor(name, np.asarray([getattr(options, name)], dtype=dtypes[name])) for name in OPTION_INPUTS]
    if options.high_noise_frac is not None:
        tensors.append(pb_utils.Tensor("high_noise_frac", np.asarray([options.high_noise_frac], dtype=np.float32)))
    return tensors + passed_on(request, ("negative_prompt",))


LORA_INPUTS = tuple(i.name for i in endpoint_lora_inputs)


def lora_tensors(request) -> list:
    """The request's LoRA inputs as they came, to pass on to a BLS callee (which checks them)."""
    return passed_on(request, LORA_INPUTS)


def image_tensors(request) -> list:
    """The request's image, strength and mask as they came, to pass on to a BLS callee (the denoiser,
    which encodes the image)."""
    return passed_on(request, IMAGE_INPUT_NAMES)


def control_tensors(request) -> list:
    """The request's ControlNet inputs as they came, to pass on to a BLS callee (the denoiser)."""
    return passed_on(request, CONTROL_INPUT_NAMES)


def ip_adapter_tensors(request) -> list:
    """The request's image prompt inputs as they came, to pass on to a BLS callee (the denoiser)."""
    return passed_on(request, IP_ADAPTER_INPUT_NAMES)


def passed_on(request, names) -> list:
    return [t for name in names if (t := pb_utils.get_input_tensor_by_name(request, name)) is not None]


def ticket_tensor(ticket: str):
    """The admission ticket as the BYTES [1] tensor a loop (scheduler, denoiser) takes."""
    from serving.admission import TICKET_TENSOR

    return pb_utils.Tensor(TICKET_TENSOR, np.array([ticket.encode()], dtype=object))
