"""The safety checker against diffusers' StableDiffusionSafetyChecker on the same weights: the
preprocessing bit-exact to CLIP's image processor, the exported graph's distances, the flags (the
special-care adjustment included) and the blacked-out images as `forward` returns them; the
deployment's setting."""

from __future__ import annotations

import types

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from contract import layout
from contract.networks import SAFETY_CHECKER
from export.modules import SafetyCheckerGraph
from export.onnx_export import write_safety_checker_files
from export.safety_checker import distances, image_processor
from export.sources import load_safety_checker
from serving.endpoint import OutputOptions
from serving.outputs import Finisher, Watermarker, parse_safety_setting
from serving.safety import ClipPreprocessor, SafetyChecker


def smooth_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Images with structure (gradients of random colours plus noise), as the checker's input varies."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(0, 255, (3, 3))
        image = a * x[..., None] + b * y[..., None] + c * (1 - x[..., None]) + rng.normal(0, 20, (height, width, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


@pytest.fixture(scope="module")
def checker(tiny_dir):
    """The tiny pipeline's checker, as diffusers loads it, and its image processor."""
    return load_safety_checker(str(tiny_dir / "safety_checker"))


def diffusers_check(checker_and_processor, images: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    """What a diffusers Stable Diffusion pipeline's `run_safety_checker` returns for uint8 images."""
    checker, processor = checker_and_processor
    clip_input = processor([Image.fromarray(image) for image in images], return_tensors="pt").pixel_values
    checked, flags = checker(images=images.astype(np.float32) / 255, clip_input=clip_input)
    return (np.asarray(checked) * 255).round().astype(np.uint8), list(flags)


def served_checker(checker_and_processor, directory, policy: str) -> SafetyChecker:
    write_safety_checker_files(types.SimpleNamespace(safety_checker=checker_and_processor[0],
                                                     feature_extractor=checker_and_processor[1]), directory)
    return SafetyChecker(directory, policy)


def graph_distances(repository):
    session = ort.InferenceSession(str(layout.onnx_path(repository, SAFETY_CHECKER.name)), providers=["CPUExecutionProvider"])
    return lambda pixels: tuple(session.run(SAFETY_CHECKER.output_names, {"pixel_values": pixels}))


@pytest.mark.parametrize("size", [(128, 128), (256, 384), (1024, 1024), (512, 1536), (1536, 640), (100, 300)])
def test_preprocessing_is_clips_image_processor_bit_for_bit(size):
    processor = image_processor()
    ours = ClipPreprocessor(processor.to_dict(), "test")
    for image in smooth_images(2, *size):
        expected = processor([Image.fromarray(image)], return_tensors="np").pixel_values[0]
        assert np.array_equal(ours(image), expected)


def test_a_preprocessor_config_it_does_not_implement_is_refused():
    config = {**image_processor().to_dict(), "do_center_crop": False}
    with pytest.raises(ValueError, match="a preprocessor config this server does not implement"):
        ClipPreprocessor(config, "safety_checker/1/preprocessor_config.json")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_graph_distances_equal_the_module(exported, checker, dtype):
    images = smooth_images(4, 256, 256)
    torch_checker = checker[0].to(torch.float16 if dtype == "fp16" else torch.float32)
    try:
        expected = distances(torch_checker, checker[1], images)
    finally:
        checker[0].to(torch.float32)
    preprocess = ClipPreprocessor(checker[1].to_dict(), "test")
    got = graph_distances(exported(dtype))(np.stack([preprocess(image) for image in images]))
    tolerance = 1e-5 if dtype == "fp32" else 2e-3
    for ours, theirs in zip(got, expected):
        assert ours.dtype == np.float32 and np.abs(ours - theirs).max() < tolerance


def test_flags_and_black_images_equal_diffusers(exported, checker, tmp_path):
    """Served scoring of the exported graph's distances, against StableDiffusionSafetyChecker.forward
    on the same images; the tiny checker flags about half of them."""
    images = smooth_images(12, 256, 256, seed=1)
    served = served_checker(checker, tmp_path, "black")
    finisher = Finisher(safety=served, distances=graph_distances(exported("fp32")))
    finished, files, flags = finisher.finish(images, OutputOptions())
    expected_images, expected_flags = diffusers_check(checker, images)
    assert list(flags) == expected_flags
    assert 0 < sum(expected_flags) < len(expected_flags), expected_flags  # both kinds: the test has teeth
    assert np.array_equal(finished, expected_images) and files is None
    assert not finished[flags].any() and np.array_equal(finished[~flags], images[~flags])


def test_the_special_care_adjustment_counts_as_in_diffusers(checker, tmp_path):
    """Thresholds set so that image 0's concept score is -0.005 (unflagged) unless a special-care
    concept fires first, which adds 0.01: diffusers flags it, and so does the served scoring."""
    module, processor = checker
    images = smooth_images(3, 256, 256, seed=2)
    concept, special = distances(module, processor, images)
    saved = module.concept_embeds_weights.clone(), module.special_care_embeds_weights.clone()
    try:
        with torch.no_grad():
            module.concept_embeds_weights.fill_(1.0)
            module.special_care_embeds_weights.fill_(1.0)
            module.concept_embeds_weights[3] = float(concept[0, 3]) + 0.005
            module.special_care_embeds_weights[1] = float(special[0, 1]) - 0.05
        expected = diffusers_check(checker, images)[1]
        served = served_checker(checker, tmp_path, "flag")
        assert expected[0]  # flagged by the adjustment alone
        assert list(served.flags(concept, special)) == expected
        with torch.no_grad():
            module.special_care_embeds_weights[1] = 1.0  # no special-care hit: no adjustment
        assert not diffusers_check(checker, images)[1][0] and not served_checker(checker, tmp_path, "flag").flags(concept, special)[0]
    finally:
        with torch.no_grad():
            module.concept_embeds_weights.copy_(saved[0])
            module.special_care_embeds_weights.copy_(saved[1])


def test_flag_policy_keeps_the_images_and_the_watermark_comes_after_the_check(exported, checker, tmp_path):
    images = smooth_images(4, 256, 256)
    run_graph = graph_distances(exported("fp32"))
    flag = Finisher(safety=served_checker(checker, tmp_path, "flag"), distances=run_graph)
    kept, _, flags = flag.finish(images, OutputOptions())
    assert np.array_equal(kept, images) and list(flags) == diffusers_check(checker, images)[1]
    black = Finisher(default_watermark=True, safety=served_checker(checker, tmp_path, "black"), distances=run_graph)
    marked, _, marked_flags = black.finish(images, OutputOptions())
    assert np.array_equal(marked_flags, flags)  # checked before the watermark: the same flags
    assert not marked[flags].any()  # black stays black, watermark or not
    assert np.array_equal(marked[~flags], Watermarker().apply(images)[~flags])


def test_checker_files_are_required(tmp_path):
    with pytest.raises(ValueError, match="no thresholds.json, preprocessor_config.json; export the safety checker again"):
        SafetyChecker(tmp_path, "flag")
    with pytest.raises(ValueError, match="expected flag or black"):
        SafetyChecker(tmp_path, "off")


def test_deployment_setting(monkeypatch):
    monkeypatch.delenv("SDXL_SAFETY_CHECKER", raising=False)
    assert parse_safety_setting("", "postprocess") == "off" and parse_safety_setting("Black", "postprocess") == "black"
    with pytest.raises(ValueError, match=r"^postprocess: parameter safety_checker='on': expected off, flag or black$"):
        parse_safety_setting("on", "postprocess")
    monkeypatch.setenv("SDXL_SAFETY_CHECKER", "flag")  # the chart's outputs.safetyChecker wins
    assert parse_safety_setting("black", "sdxl_stream") == "flag"
    monkeypatch.setenv("SDXL_SAFETY_CHECKER", "yes")
    with pytest.raises(ValueError, match=r"^sdxl_stream: \$SDXL_SAFETY_CHECKER='yes': expected off, flag or black$"):
        parse_safety_setting("off", "sdxl_stream")


def test_a_checker_of_another_input_size_is_refused_at_export(tmp_path):
    from export.safety_checker import build_safety_checker, write_safety_checker
    from export.sources import ExportError

    processor = image_processor()
    processor.crop_size = {"height": 256, "width": 256}
    write_safety_checker(tmp_path / "checker", build_safety_checker(full_size=False, seed=0), processor)
    with pytest.raises(ExportError, match=r"a 256x256 crop; the safety_checker network takes 224x224"):
        load_safety_checker(str(tmp_path / "checker"))


def test_graph_module_is_diffusers_forward_up_to_the_distances(checker):
    """SafetyCheckerGraph's distances are the ones forward() scores (cosine_distance of the projection)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    module, processor = checker
    pixels = processor([Image.fromarray(i) for i in smooth_images(2, 224, 224)], return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = module.visual_projection(module.vision_model(pixels)[1])
        concept, special = SafetyCheckerGraph(module)(pixels)
    assert torch.allclose(concept, cosine_distance(embeds, module.concept_embeds), atol=1e-6)
    assert torch.allclose(special, cosine_distance(embeds, module.special_care_embeds), atol=1e-6)
