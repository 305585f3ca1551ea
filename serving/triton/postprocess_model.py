"""`postprocess`: the last step of `ensemble_sdxl`. The final images checked by the safety checker
where the deployment runs it, watermarked where the request or the deployment asks, encoded where
`output_format` asks (serving/outputs.py, serving/safety.py).

Config parameters: apply_watermark (true or false) and safety_checker (off, flag or black): the
deployment's settings ($SDXL_APPLY_WATERMARK and $SDXL_SAFETY_CHECKER win).
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.endpoint import OUTPUT_INPUT_NAMES, check_output

from .common import endpoint_finisher, error_response, input_arrays, respond, traced
from .settings import ModelSettings

NOT_CHECKED = np.empty(0, dtype=bool)  # nsfw_detected where the deployment runs no safety checker


class TritonPythonModel:
    def initialize(self, args):
        try:
            self.finisher = endpoint_finisher(ModelSettings.from_args(args, "postprocess"))
        except ValueError as error:
            raise pb_utils.TritonModelException(str(error)) from None

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                with traced(request):
                    responses.append(self._finish(request))
            except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
                responses.append(error_response(error, "postprocess"))
        return responses

    def _finish(self, request):
        images = pb_utils.get_input_tensor_by_name(request, "images")
        options = check_output(input_arrays(request, OUTPUT_INPUT_NAMES))
        if not self.finisher.changes(options):
            return respond(request, {"images": images, "encoded_images": np.empty(0, dtype=object), "nsfw_detected": NOT_CHECKED})
        finished, files, flags = self.finisher.finish(images.as_numpy(), options)
        # Every output: Triton sends the client those it asked for (only encoded_images: no pixels).
        return respond(request, {"images": finished, "encoded_images": np.asarray(files or [], dtype=object),
                                 "nsfw_detected": NOT_CHECKED if flags is None else flags})
