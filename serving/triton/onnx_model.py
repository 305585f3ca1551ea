"""CPU variant of the networks (text_encoder, unet, unet_lora, vae_decoder, vae_encoder, preview_decoder):
the exported ONNX graph run by ONNX Runtime.

The bundled tritonserver has no ONNX Runtime backend, so this Python-backend model stands in for it
with the same tensor names, dtypes and shapes as the production TensorRT configs. Requests that
dynamic batching hands over together are concatenated along the batch axis (grouped by shape) and
run as one ONNX Runtime call. Config parameters: network (default: the model's name),
intra_op_threads (default: ONNX Runtime's choice), max_rows_per_run (default 0: all rows in one
call; the VAE decoder's CPU config sets 1, since ONNX Runtime's peak memory grows by about 2 GiB
per 1024x1024 image: measured, benchmarks/results/faults_cpu.md), load_session (at_start, the
default, or first_request: `unet_lora`'s, so that a deployment whose requests name no LoRA never
holds a second copy of the UNet's weights: 10 GiB in fp32 at SDXL's size; the graph's interface is
still checked at load, from its structure alone), max_input_elements_per_run (default 0: no bound;
the UNet's CPU config bounds the rows of a call by their size: its attention's memory grows with
rows x pixels squared, and 4 rows at 1536x1536 were killed by the OOM killer), memory_arena (on, the default, or off: the VAE
decoder's, whose arena at 1536x1536 held 16.1 GiB against a 7.3 GiB peak without it).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort

from contract import layout
from contract.configs import graph_interface
from contract.networks import NETWORKS
from serving.batching import group_by_shape, run_concatenated
from serving.ort_session import session_options

from .common import error_response, input_arrays, respond
from .settings import ModelSettings

# ONNX Runtime's tensor type names -> Triton's
ONNX_RUNTIME_TYPES = {"tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(int32)": "INT32",
                      "tensor(int64)": "INT64", "tensor(uint8)": "UINT8"}


class TritonPythonModel:
    def initialize(self, args):
        settings = ModelSettings.from_args(args)
        network = settings.parameters.get("network", settings.model)
        if network not in NETWORKS:
            raise settings.error(f"parameter network={network!r}: expected one of {', '.join(NETWORKS)}")
        if network != settings.model:  # messages name the model and the network it serves
            settings = replace(settings, model=f"{settings.model} ({network})")
        self.spec = NETWORKS[network]
        path = settings.version_dir / layout.ONNX_FILE
        if not path.exists():
            raise settings.error(f"no {path}; run `python -m export onnx` (or `make export-tiny`) first")
        options = session_options(path)  # FP8 graphs: the basic optimization level
        options.intra_op_num_threads = settings.count("intra_op_threads", "0", "0: ONNX Runtime's choice")
        self.max_rows = settings.count("max_rows_per_run", "0", "0: all at once")
        self.max_elements = settings.count("max_input_elements_per_run", "0", "0: no bound")
        # off: ONNX Runtime frees each intermediate instead of keeping its arena at the largest run's
        # size (SDXL's VAE decoder at 1536x1536 in fp32: 16.1 GiB peak with it, 7.3 GiB without, 1.2x the time).
        options.enable_cpu_mem_arena = settings.choice("memory_arena", "on", ("on", "off")) == "on"
        when = settings.choice("load_session", "at_start", ("at_start", "first_request"))
        self.path, self.options, self._session = path, options, None
        interface = self.session_interface() if when == "at_start" else graph_interface(path)
        graph_inputs = [name for name in interface if name not in self.spec.output_names]
        if graph_inputs != self.spec.input_names:
            raise settings.error(f"{path} has inputs {graph_inputs}, expected {self.spec.input_names}")
        graph_file = f"{settings.model_dir.name}/{settings.version}/{layout.ONNX_FILE}"
        settings.check_graph_interface({name: (dtype, dims, graph_file) for name, (dtype, dims) in interface.items()}, network)

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            self._session = ort.InferenceSession(str(self.path), self.options, providers=["CPUExecutionProvider"])
        return self._session

    def session_interface(self) -> dict[str, tuple[str, list[int]]]:
        return {t.name: (ONNX_RUNTIME_TYPES.get(t.type, t.type), [d if isinstance(d, int) else -1 for d in t.shape])
                for t in self.session.get_inputs() + self.session.get_outputs()}

    def rows_per_run(self, inputs: dict) -> int:
        """Rows one ONNX Runtime call may hold (0: all): max_rows_per_run, and as many rows as keep
        the first input within max_input_elements_per_run (at least one)."""
        if not self.max_elements:
            return self.max_rows
        per_row = int(np.prod(inputs[self.spec.input_names[0]].shape[1:]))
        fitting = max(1, self.max_elements // max(per_row, 1))
        return min(fitting, self.max_rows) if self.max_rows else fitting

    def execute(self, requests):
        responses = [None] * len(requests)
        arrays = [input_arrays(request, self.spec.input_names) for request in requests]
        for indices in group_by_shape(arrays, self.spec.input_names):
            try:
                group = [arrays[i] for i in indices]
                outputs = run_concatenated(
                    lambda feed: self.session.run(self.spec.output_names, feed),
                    group, self.spec.input_names, self.spec.output_names, self.rows_per_run(group[0]),
                )
                for i, per_request in zip(indices, outputs):
                    responses[i] = respond(requests[i], per_request)
            except Exception as error:  # noqa: BLE001 - fail this group's requests, not the model
                for i in indices:
                    responses[i] = error_response(error, self.spec.name)
        return responses

