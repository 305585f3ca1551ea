"""CPU variant of text_encoder, unet and vae_decoder: the exported ONNX graph run by ONNX Runtime.

The bundled tritonserver has no ONNX Runtime backend, so this Python-backend model stands in for it
with the same tensor names, dtypes and shapes as the production TensorRT configs. Requests that
dynamic batching hands over together are concatenated along the batch axis (grouped by shape) and
run as one ONNX Runtime call. Config parameters: network (default: the model's name),
intra_op_threads (default: ONNX Runtime's choice).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from export import layout
from export.networks import NETWORKS

from .common import error_response, input_arrays, model_config, parameters, version_dir


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(model_config(args))
        network = params.get("network", args["model_name"])
        if network not in NETWORKS:
            raise pb_utils.TritonModelException(f"{args['model_name']}: parameter network={network!r}: expected one of {', '.join(NETWORKS)}")
        self.spec = NETWORKS[network]
        path = version_dir(args) / layout.ONNX_FILE
        if not path.exists():
            raise pb_utils.TritonModelException(f"{network}: no {path}; run `python -m export onnx` (or `make export-tiny`) first")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", 0))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if graph_inputs != self.spec.input_names:
            raise pb_utils.TritonModelException(f"{network}: {path} has inputs {graph_inputs}, expected {self.spec.input_names}")

    def execute(self, requests):
        responses = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        arrays = []
        for index, request in enumerate(requests):
            inputs = input_arrays(request, self.spec.input_names)
            arrays.append(inputs)
            key = tuple(inputs[name].shape[1:] for name in self.spec.input_names)
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            try:
                outputs = self._run([arrays[i] for i in indices])
                for i, per_request in zip(indices, outputs):
                    responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in per_request.items()])
            except Exception as error:  # noqa: BLE001 - fail this group's requests, not the model
                for i in indices:
                    responses[i] = error_response(error, self.spec.name)
        return responses

    def _run(self, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        feed = {name: np.concatenate([inputs[name] for inputs in batch]) for name in self.spec.input_names}
        results = self.session.run(self.spec.output_names, feed)
        sizes = np.cumsum([inputs[self.spec.input_names[0]].shape[0] for inputs in batch])[:-1]
        split = [np.split(result, sizes) for result in results]
        return [{name: split[k][j] for k, name in enumerate(self.spec.output_names)} for j in range(len(batch))]
