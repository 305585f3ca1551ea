"""`tokenizer`: prompt (+ negative prompt when CFG uses it) -> token ids for both CLIP encoders."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from serving.endpoint import check_guidance, check_prompts
from serving.text import PromptTokenizer, texts_to_encode

from .common import error_response, input_arrays, version_dir

INPUTS = ("prompt", "negative_prompt", "guidance_scale")


class TritonPythonModel:
    def initialize(self, args):
        directory = version_dir(args)
        if not (directory / "tokenizer").is_dir():
            raise pb_utils.TritonModelException(
                f"tokenizer: no tokenizer files in {directory}; run `python -m export onnx` (or `make export-tiny`) first"
            )
        self.tokenizer = PromptTokenizer(directory)

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            raw = input_arrays(request, INPUTS)
            prompt, negative = check_prompts(raw)
            do_cfg = check_guidance(raw["guidance_scale"]) > 1.0
            ids = self.tokenizer(texts_to_encode(prompt, negative, do_cfg))
            return pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in ids.items()])
        except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
            return error_response(error, "tokenizer")
