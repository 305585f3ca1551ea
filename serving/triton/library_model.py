"""`loras`: the repository's LoRA library (docs/loras.md), what `python -m client --info` lists.
Read from disk at each request: a LoRA added or removed while the server runs shows at once."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from contract import loras

from .common import error_response, respond
from .settings import ModelSettings


class TritonPythonModel:
    def initialize(self, args):
        self.repository = ModelSettings.from_args(args).repository

    def execute(self, requests):
        try:
            listing = np.array([json.dumps(loras.served_description(info)).encode() for info in loras.describe(self.repository)],
                               dtype=np.object_)
        except (OSError, ValueError, TypeError) as error:  # a library entry that cannot be read
            return [error_response(RuntimeError(f"the LoRA library {loras.library_dir(self.repository)}: {error}"), "loras")
                    for _ in requests]
        return [respond(request, {"loras": pb_utils.Tensor("loras", listing)}) for request in requests]
