"""What a Python-backend model reads at load, read once into one object and passed down.

Triton hands `initialize` a dict of strings (the model config as JSON, where the model lives, its
instance). ModelSettings turns it into what the layers below need: the model's name, its directories,
its config and parameters, and, read on first use and then kept, the endpoint's limits, the admission
policy, the repository's export record and its LoRA library. Every problem is one
TritonModelException that names the model and the setting: the load fails with it, never a request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import triton_python_backend_utils as pb_utils


@dataclass(frozen=True)
class ModelSettings:
    model: str  # the name the model's messages start with (sdxl_stream, tokenizer...)
    model_dir: Path  # <repository>/<model>
    version: str
    config: dict  # the model config Triton loaded (the variant's: configs/cpu.pbtxt or config.pbtxt)
    parameters: dict[str, str]
    device_id: int

    @classmethod
    def from_args(cls, args: dict, model: str | None = None) -> "ModelSettings":
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        return cls(model or args["model_name"], Path(args["model_repository"]), args["model_version"], config, parameters,
                   int(args.get("model_instance_device_id") or 0))

    @property
    def repository(self) -> Path:
        return self.model_dir.parent

    @property
    def version_dir(self) -> Path:
        return self.model_dir / self.version

    @property
    def config_file(self) -> str:
        """Which file Triton loaded the config from, for messages: configs/<variant>.pbtxt of a
        Python-backend variant when one exists (--model-config-name), else config.pbtxt."""
        for path in sorted((self.model_dir / "configs").glob("*.pbtxt")):
            if 'backend: "python"' in path.read_text():
                return f"{self.model_dir.name}/configs/{path.name}"
        return f"{self.model_dir.name}/config.pbtxt"

    def sibling(self, model: str) -> "ModelSettings":
        """Another model's settings, as its config in the repository says: for a model that does that
        one's work in its own process (sdxl_stream tokenizes and admits as the tokenizer would). The
        model must have one config for every variant (config.pbtxt alone), which a test checks."""
        from google.protobuf import json_format

        from contract.configs import parameters, read_config

        try:
            config = read_config(self.repository, model)
        except (OSError, ValueError) as error:  # text_format's ParseError is a ValueError
            raise self.error(f"cannot read {model}'s config, whose work this model does: {error}") from None
        # Messages name this model, whose load a problem fails, as its own settings' do.
        return ModelSettings(self.model, self.repository / model, self.version,
                             json_format.MessageToDict(config, preserving_proto_field_name=True), parameters(config), self.device_id)

    def error(self, message: str) -> Exception:
        """The exception that fails the load: `<model>: <message>`."""
        return pb_utils.TritonModelException(f"{self.model}: {message}")

    # --- one parameter -------------------------------------------------------------------------------

    def count(self, name: str, default: str, meaning: str) -> int:
        """A non-negative integer parameter; `meaning` says what 0 means, for the error."""
        text = self.parameters.get(name, default)
        if not text.isdigit():
            raise self.error(f"parameter {name}={text!r}: expected a count ({meaning})")
        return int(text)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        text = self.parameters.get(name, default)
        if text not in choices:
            raise self.error(f"parameter {name}={text!r}: expected {' or '.join(choices)}")
        return text

    # --- what the parameters and the repository say, read once ---------------------------------------

    def _read(self, read):
        """read(): its ValueError (LoraError is one) fails the load, naming the model."""
        try:
            return read()
        except ValueError as error:
            raise self.error(str(error)) from None

    @cached_property
    def limits(self):
        """The endpoint's limits (contract/limits.py) from the parameters."""
        from contract.limits import Limits

        return self._read(lambda: Limits.from_parameters(self.parameters))

    @cached_property
    def admission(self):
        """The admission policy (serving/admission.py) from the parameters."""
        from serving.admission import AdmissionPolicy

        return self._read(lambda: AdmissionPolicy.from_parameters(self.parameters))

    @cached_property
    def export(self):
        """(dtype, dims) the repository's graphs were exported with (contract.configs.repository_export); None without graphs."""
        from contract.configs import repository_export

        return self._read(lambda: repository_export(self.repository))

    @cached_property
    def loras(self):
        """The repository's LoRA library as requests read it (serving/loras.py)."""
        from serving.loras import ServingLoras

        return self._read(lambda: ServingLoras(self.repository, self.export[0] if self.export else "fp32", self.limits.max_stacked_rank))

    @cached_property
    def controlnets(self) -> dict:
        """The ControlNets the repository serves, {name a request uses: contract.controlnets.ServedControl}."""
        from serving.controlnets import served_controlnets

        return served_controlnets(self.repository)

    @cached_property
    def ip_adapter(self):
        """The IP-Adapter the repository serves (serving.ip_adapters.ServedIPAdapter); None without one."""
        from serving.ip_adapters import ServedIPAdapter

        return self._read(lambda: ServedIPAdapter.load(self.repository))

    def check_graph_interface(self, graph: dict[str, tuple[str, list[int], str]], model: str | None = None) -> None:
        """Fail the load, with one message naming the model, both sides and the fix, when the config
        declares other types or dims than the graph it serves or passes tensors to (`graph`: tensor ->
        (Triton type, dims with -1 for dynamic, graph file))."""
        from contract.configs import declared_interface_json, graph_mismatch

        problem = graph_mismatch(model or self.model, graph, declared_interface_json(self.config), self.config_file,
                                 self.repository)
        if problem:
            raise pb_utils.TritonModelException(problem)
