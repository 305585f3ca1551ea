"""The depth estimator that makes depth control maps on the server (contract/networks.py DEPTH_ESTIMATOR):
a transformers depth-estimation model and its image processor. Depth Anything V2 Small
(depth-anything/Depth-Anything-V2-Small-hf, Apache-2.0: DINOv2-S/14 + DPT head, 24.8 M parameters) is
the one the docs name; any DepthAnythingForDepthEstimation directory or hub id loads the same way."""

from __future__ import annotations

from pathlib import Path

import torch

from .progress import log

DEFAULT_DEPTH_ESTIMATOR = "depth-anything/Depth-Anything-V2-Small-hf"
# Its parameters (the model card: 24.8 M), counted on depth_anything_v2_small_config().
DEPTH_ANYTHING_V2_SMALL_PARAMETERS = 24_785_089
# Where random pipelines keep their depth estimator (export tiny, export random).
DEPTH_SUBFOLDER = "depth_estimator"


def depth_anything_v2_small_config():
    """Depth-Anything-V2-Small-hf's architecture (its config.json): DINOv2-S/14 (384 wide, 6 heads, 12
    layers) read at layers 3, 6, 9, 12, DPT neck 48/96/192/384, fusion 64, relative depth."""
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(hidden_size=384, num_attention_heads=6, num_hidden_layers=12, image_size=518, patch_size=14,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64,
                               head_hidden_size=32, depth_estimation_type="relative")


def depth_processor(size: int = 518):
    """Depth Anything's image processor (its preprocessor_config.json): resized with the aspect kept,
    the side nearer its scale to `size`, both to multiples of 14, bicubic; x / 255; ImageNet mean and std."""
    from transformers import DPTImageProcessor

    return DPTImageProcessor(do_resize=True, size={"height": size, "width": size}, keep_aspect_ratio=True, ensure_multiple_of=14,
                             resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=False)


def tiny_depth_estimator(seed: int):
    """A Depth Anything of Depth-Anything-V2-Small's layout at a fraction of its width and depth (random
    weights), with a processor at 112 pixels: what the demo and the tests serve."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=4, intermediate_size=64, image_size=112,
                            patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type="relative")
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # He-initialized convolutions: transformers' small init leaves depths near 1e-7
        for layer in [*model.neck.modules(), *model.head.modules()]:
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.kaiming_normal_(layer.weight)
                if layer.bias is not None:
                    layer.bias.normal_(std=0.1)
    return model, depth_processor(112)


def write_tiny_depth_estimator(out_dir: Path, seed: int) -> None:
    model, processor = tiny_depth_estimator(seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    log(f"depth estimator (Depth Anything, tiny, random weights) written to {out_dir}")


def load_depth_estimator(source: str, flag: str = "--depth-estimator"):
    """(model, image processor) of a transformers depth-estimation model: a directory or hub id."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from .sources import ExportError, _load_error

    path = Path(source).expanduser()
    location = str(path) if path.exists() else source
    try:
        model = AutoModelForDepthEstimation.from_pretrained(location, dtype=torch.float32)
        processor = AutoImageProcessor.from_pretrained(location)
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error(flag, source, error) from error
    if type(model).__name__ != "DepthAnythingForDepthEstimation" or not hasattr(processor, "ensure_multiple_of"):
        raise ExportError(f"{flag} {source!r}: a {type(model).__name__} with a {type(processor).__name__}; expected Depth "
                          "Anything (DepthAnythingForDepthEstimation and its DPTImageProcessor: "
                          f"{DEFAULT_DEPTH_ESTIMATOR})")
    return model.eval(), processor
