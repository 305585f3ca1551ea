"""`postprocess`: the last step of `ensemble_sdxl`. The final images, watermarked where the request
or the deployment asks, and encoded where `output_format` asks (serving/outputs.py).

Config parameters: apply_watermark (true or false: the deployment's setting).
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.endpoint import OUTPUT_INPUT_NAMES, check_output
from serving.outputs import Finisher, parse_watermark_setting

from .common import error_response, input_arrays, model_config, parameters, respond


class TritonPythonModel:
    def initialize(self, args):
        try:
            watermark = parse_watermark_setting(parameters(model_config(args)).get("apply_watermark", ""), "postprocess")
        except ValueError as error:
            raise pb_utils.TritonModelException(str(error)) from None
        self.finisher = Finisher(default_watermark=watermark)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._finish(request))
            except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
                responses.append(error_response(error, "postprocess"))
        return responses

    def _finish(self, request):
        images = pb_utils.get_input_tensor_by_name(request, "images")
        options = check_output(input_arrays(request, OUTPUT_INPUT_NAMES))
        if not self.finisher.changes(options):
            return respond(request, {"images": images, "encoded_images": np.empty(0, dtype=object)})
        finished, files = self.finisher.finish(images.as_numpy(), options)
        # Both outputs: Triton sends the client those it asked for (only encoded_images: no pixels).
        return respond(request, {"images": finished, "encoded_images": np.asarray(files or [], dtype=object)})
