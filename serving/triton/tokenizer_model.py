"""`tokenizer`: the ensemble's first step. Checks the texts and the LoRAs named, admits the request
to the denoising queue or refuses it at once (serving/admission.py), and tokenizes the prompt (+ the
negative prompt when CFG uses it) for both CLIP encoders, with each text's LoRA weights for them
(serving/loras.py: the request's text-encoder LoRAs, or zeros).

Config parameters: max_prompt_bytes (contract/limits.py), max_queue_size, default_queue_timeout_ms,
ticket_ttl_s (serving/admission.py AdmissionPolicy).
"""

from __future__ import annotations

import json
import os

import numpy as np

from serving.admission import TICKET_TENSOR, Refused, RunState, queue_timeout_s, run_directory
from contract.networks import TEXT_ENCODER
from serving.endpoint import InvalidInput, check_guidance, check_prompts
from serving.loras import check_request
from serving.text import PromptTokenizer, texts_to_encode

from .common import error_response, input_arrays, respond
from .metrics import AdmissionMetrics
from .settings import ModelSettings

INPUTS = ("prompt", "negative_prompt", "guidance_scale", "lora_names", "lora_scales")


class TritonPythonModel:
    def initialize(self, args):
        settings = ModelSettings.from_args(args, "tokenizer")
        directory = settings.version_dir
        if not (directory / "tokenizer").is_dir():
            raise settings.error(f"no tokenizer files in {directory}; run `python -m export onnx` (or `make export-tiny`) first")
        self.limits, self.policy = settings.limits, settings.admission
        self.tokenizer = PromptTokenizer(directory)
        self.loras = settings.loras
        self.run = RunState(run_directory(os.getppid())).create()  # the stub's parent is tritonserver
        self.metrics = AdmissionMetrics(args["model_name"])

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            raw = input_arrays(request, INPUTS)
            prompt, negative = check_prompts(raw, self.limits)
            # An omitted guidance_scale is the recipe's default, as the loop will read it (sdxl-base: CFG 5.0).
            do_cfg = check_guidance(raw["guidance_scale"], self.limits.default_guidance) > 1.0
            named = check_request(raw["lora_names"], raw["lora_scales"], self.limits.max_loras, self.limits.max_lora_scale)
            held = self.loras.load(named)  # before admission: an unknown name costs no place in the queue
            timeout = queue_timeout_s(request_parameters(request), self.policy)
            ticket = self.run.admit(self.policy, timeout)  # last: a refused request cost nothing
            self.metrics.admitted.increment(1)
            texts = texts_to_encode(prompt, negative, do_cfg, refiner=self.limits.has_refiner)
            ids = self.tokenizer(texts)
            lora = self.loras.tensors(TEXT_ENCODER.name, held, len(texts))
            tensors = {**ids, **lora, TICKET_TENSOR: np.array([ticket.encode()], dtype=object)}
            return respond(request, tensors)
        except Refused as refusal:
            self.metrics.refused(refusal.reason)
            return error_response(refusal, "tokenizer")
        except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
            return error_response(error, "tokenizer")


def request_parameters(request) -> dict:
    """The request's parameters (Triton hands them over as JSON text); bad ones are the client's error."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidInput("parameters", type(error).__name__, "request parameters in UTF-8") from None
    return parameters if isinstance(parameters, dict) else {}
