"""The configs against the real full-size SDXL graphs: `make bench-scale` exported SDXL base 1.0's
architecture (random weights, LCM-LoRA-shaped LoRA fused, fp16) and kept the graphs here without
their weights (tests/data/sdxl_graphs/: structure, interface and initializer shapes, a few MB)."""

from __future__ import annotations

import math

import onnx
import pytest

from contract.configs import graph_interface, interface_mismatches, read_config
from contract.layout import TEMPLATES as REPO
from contract.layout import REPO_ROOT
from contract.networks import NETWORKS, SDXL_DIMS
from export.onnx_export import check_graph_io
from export.sdxl import PARAMETERS, REFINER_UNET_PARAMETERS

SKELETONS = REPO_ROOT / "tests" / "data" / "sdxl_graphs"


@pytest.mark.parametrize("variant", ["production", "cpu"])
@pytest.mark.parametrize("network", NETWORKS)
def test_configs_agree_with_the_full_size_graph(network, variant):
    interface = graph_interface(SKELETONS / f"{network}.onnx")
    assert interface_mismatches(read_config(REPO, network, variant), interface) == []


@pytest.mark.parametrize("network", NETWORKS)
def test_full_size_graph_is_the_spec_at_sdxl_widths(network):
    check_graph_io(onnx.load(str(SKELETONS / f"{network}.onnx")), NETWORKS[network], SDXL_DIMS, "FP16")


def initializer_count(network: str) -> int:
    model = onnx.load(str(SKELETONS / f"{network}.onnx"))
    return sum(math.prod(t.dims) for t in model.graph.initializer)


@pytest.mark.parametrize("network,components", [
    ("unet", ("unet",)), ("text_encoder", ("text_encoder", "text_encoder_2")),
])
def test_full_size_graph_holds_sdxls_weights(network, components):
    """The graph's weights are the full model's (the LoRA is fused: no extra parameters); constants
    the exporter adds (shapes, scalars) and positions it folds away move the count by well under 1%."""
    published = sum(PARAMETERS[c] for c in components)
    assert abs(initializer_count(network) - published) / published < 0.01


def test_full_size_refiner_graph_holds_the_refiners_weights():
    """stabilityai/stable-diffusion-xl-refiner-1.0's UNet architecture (export/sdxl.py), exported in fp16
    with random weights as `make bench-scale` exports the others."""
    published = REFINER_UNET_PARAMETERS
    assert abs(initializer_count("refiner_unet") - published) / published < 0.01


def test_full_size_depth_estimator_holds_depth_anything_v2_smalls_weights():
    """Depth-Anything-V2-Small's architecture (export/depth.py), exported in fp16 with random weights as
    `make bench-controlnet` exports it (the DINOv2 mask token, unused at inference, folds away)."""
    from export.depth import DEPTH_ANYTHING_V2_SMALL_PARAMETERS

    published = DEPTH_ANYTHING_V2_SMALL_PARAMETERS
    assert abs(initializer_count("depth_estimator") - published) / published < 0.01


def test_configs_disagree_with_a_graph_of_other_widths():
    """The check has teeth: the production configs' SDXL widths do not fit the tiny graphs."""
    interface = graph_interface(SKELETONS / "unet.onnx")
    interface["encoder_hidden_states"] = ("FP16", [-1, 77, 80])
    assert interface_mismatches(read_config(REPO, "unet"), interface) == [
        "encoder_hidden_states: config dims [-1, 77, 2048], graph [-1, 77, 80]"]
