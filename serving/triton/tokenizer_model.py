"""`tokenizer`: the ensemble's first step. Checks the texts and the LoRAs named, admits the request
to the denoising queue or refuses it at once (serving/admission.py), and tokenizes the prompt (+ the
negative prompt when CFG uses it) for both CLIP encoders, with each text's LoRA weights for them
(serving/loras.py: the request's text-encoder LoRAs, or zeros).

Config parameters: max_prompt_bytes (contract/limits.py), max_queue_size, default_queue_timeout_ms,
ticket_ttl_s (serving/admission.py AdmissionPolicy).
"""

from __future__ import annotations

import os

import numpy as np

from serving.admission import TICKET_TENSOR, Refused, RunState, queue_timeout_s, run_directory
from serving.text import TEXT_INPUTS, PromptTokenizer, TextInputs

from .common import error_response, input_arrays, request_parameters, respond
from .metrics import AdmissionMetrics
from .settings import ModelSettings


def text_inputs(settings: ModelSettings) -> TextInputs:
    """The tokenizer's work as its settings configure it: this model's, or sdxl_stream's copy of them
    (ModelSettings.sibling), which does the same work in its own process. Fails the load without the files."""
    directory = settings.version_dir
    if not (directory / "tokenizer").is_dir():
        raise settings.error(f"no tokenizer files in {directory}; run `python -m export onnx` (or `make export-tiny`) first")
    return TextInputs(PromptTokenizer(directory), settings.limits, settings.loras)


class TritonPythonModel:
    def initialize(self, args):
        settings = ModelSettings.from_args(args, "tokenizer")
        self.policy, self.text_inputs = settings.admission, text_inputs(settings)
        self.run = RunState(run_directory(os.getppid())).create()  # the stub's parent is tritonserver
        self.metrics = AdmissionMetrics(args["model_name"])

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            tensors = self.text_inputs(input_arrays(request, TEXT_INPUTS))  # before admission: bad input costs no place
            timeout = queue_timeout_s(request_parameters(request), self.policy)
            ticket = self.run.admit(self.policy, timeout)  # last: a refused request cost nothing
            self.metrics.admitted.increment(1)
            return respond(request, {**tensors, TICKET_TENSOR: np.array([ticket.encode()], dtype=object)})
        except Refused as refusal:
            self.metrics.refused(refusal.reason)
            return error_response(refusal, "tokenizer")
        except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
            return error_response(error, "tokenizer")

