"""The config.pbtxt files agree with the network specs, the endpoint and each other."""

from __future__ import annotations

import pytest

from contract import networks
from contract.networks import SDXL_DIMS
from serving import endpoint
from contract.configs import data_type, expected_dims, parameters, read_config, scheduler_limits
from contract.layout import TEMPLATES as REPO
from serving.admission import TICKET_TENSOR

VARIANTS = {"production": SDXL_DIMS, "cpu": SDXL_DIMS}  # both declare SDXL's widths in git


def io(config, kind):
    return list(getattr(config, kind))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("network", networks.NETWORKS)
def test_network_config_matches_spec(network, variant):
    config = read_config(REPO, network, variant)
    spec = networks.NETWORKS[network]
    assert config.name == network
    if variant == "production":
        assert config.platform == "tensorrt_plan"
    else:
        assert config.backend == "python"
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    for kind, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        declared = io(config, kind)
        assert [t.name for t in declared] == [t.name for t in tensors], kind
        for entry, tensor in zip(declared, tensors):
            dims, reshape = expected_dims(tensor, batched=True, model=VARIANTS[variant])
            assert list(entry.dims) == dims, f"{network}.{tensor.name}"
            assert model_config_type(entry) == data_type(tensor), f"{network}.{tensor.name}"
            if reshape is not None:
                assert entry.HasField("reshape") and list(entry.reshape.shape) == reshape, f"{network}.{tensor.name}"


def model_config_type(entry) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(entry.data_type)


@pytest.mark.parametrize("variant", VARIANTS)
def test_production_and_cpu_differ_only_in_backend_and_widths(variant):
    for network in networks.NETWORKS:
        production, other = read_config(REPO, network), read_config(REPO, network, variant)
        assert production.max_batch_size == other.max_batch_size
        assert [t.name for t in production.input] == [t.name for t in other.input]
        assert [t.data_type for t in production.output] == [t.data_type for t in other.output]


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_sizes_follow_the_endpoint_limits(variant):
    limits = scheduler_limits(REPO, variant)
    assert limits.max_images == 4
    assert read_config(REPO, "unet", variant).max_batch_size == 2 * limits.max_images  # CFG doubles the batch
    assert read_config(REPO, "vae_decoder", variant).max_batch_size == limits.max_images
    assert read_config(REPO, "text_encoder", variant).max_batch_size >= 2  # prompt + negative prompt


def test_size_limits():
    assert (scheduler_limits(REPO).min_size, scheduler_limits(REPO).max_size) == (512, 1536)
    assert (scheduler_limits(REPO, "cpu").min_size, scheduler_limits(REPO, "cpu").max_size) == (128, 1536)
    assert parameters(read_config(REPO, "scheduler"))["device"] == "cuda"
    assert parameters(read_config(REPO, "scheduler", "cpu"))["device"] == "cpu"


@pytest.mark.parametrize("variant", VARIANTS)
def test_scheduler_speaks_the_graphs_tensors(variant):
    config = read_config(REPO, "scheduler", variant)
    inputs = {t.name: t for t in config.input}
    model = VARIANTS[variant]
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        tensor = networks.TEXT_ENCODER.tensor(name)
        assert list(inputs[name].dims) == expected_dims(tensor, batched=False, model=model)[0]
        assert model_config_type(inputs[name]) == data_type(tensor)
    latents = {t.name: t for t in config.output}["latents"]
    assert list(latents.dims) == expected_dims(networks.VAE_DECODER.tensor("latents"), batched=False, model=model)[0]
    options = [t for t in config.input if t.name not in ("prompt_embeds", "pooled_prompt_embeds", TICKET_TENSOR)]
    assert all(t.optional for t in options)
    assert [t.name for t in options] == [i.name for i in endpoint.INPUTS if i.dtype != "STRING"] + \
        [i.name for i in (*endpoint.LORA_INPUTS, *endpoint.IMAGE_INPUTS, *endpoint.OUTPUT_INPUTS, *endpoint.REFINER_INPUTS,
                          *endpoint.CONTROL_INPUTS, *endpoint.IP_ADAPTER_INPUTS)] + \
        ["negative_prompt"]  # the loop tells an empty one (the refiner encodes it) from a given one


def test_ensemble_is_the_endpoint():
    config = read_config(REPO, endpoint.MODEL_NAME)
    assert config.platform == "ensemble" and config.max_batch_size == 0
    declared = endpoint.ENDPOINT_INPUTS
    assert [t.name for t in config.input] == [i.name for i in declared]
    for entry, spec in zip(config.input, declared):  # LoRAs: [K], up to max_loras; image [H, W, 3], mask [H, W]
        assert model_config_type(entry) == "TYPE_" + spec.dtype and tuple(entry.dims) == spec.dims and entry.optional
    assert {t.name: (model_config_type(t)[5:], tuple(t.dims)) for t in config.output} == endpoint.OUTPUTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_ensemble_steps_wire_real_tensors(variant):
    """Every step maps existing inputs/outputs of its model, and every step input is produced upstream."""
    ensemble = read_config(REPO, endpoint.MODEL_NAME)
    available = {i.name for i in endpoint.ENDPOINT_INPUTS}
    for step in ensemble.ensemble_scheduling.step:
        model = read_config(REPO, step.model_name, variant)
        assert set(step.input_map) <= {t.name for t in model.input}, step.model_name
        required = {t.name for t in model.input if not t.optional}
        assert required <= set(step.input_map), f"{step.model_name} misses {required - set(step.input_map)}"
        assert set(step.input_map.values()) <= available, step.model_name
        assert set(step.output_map) <= {t.name for t in model.output}, step.model_name
        available |= set(step.output_map.values())
    assert {"images", "seeds"} <= available
