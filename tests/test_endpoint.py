"""serving.endpoint: defaults, and a clear error for every bad value (field, value, what is accepted)."""

from __future__ import annotations

import numpy as np
import pytest

from contract.limits import Limits
from serving.endpoint import DEFAULTS, InvalidInput, check_guidance, check_options, check_prompts

CPU = Limits(min_size=128)


def arr(value, dtype):
    return np.array([value], dtype=dtype)


def test_defaults():
    options = check_options({}, Limits(), draw_seed=lambda bound: 1234)
    assert (options.seed, options.num_inference_steps, options.guidance_scale) == (1234, 4, 1.0)
    assert (options.height, options.width, options.num_images_per_prompt) == (1024, 1024, 1)
    assert not options.do_classifier_free_guidance and options.seeds == [1234]
    assert check_prompts({"prompt": np.array([b"a cat"], dtype=object)}) == ("a cat", "")


def test_random_seed_is_drawn_per_request():
    seeds = {check_options({}, Limits()).seed for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)


def test_given_values_and_seeds():
    raw = {"seed": arr(7, np.int64), "num_inference_steps": arr(2, np.int32), "guidance_scale": arr(1.5, np.float32),
           "height": arr(128, np.int32), "width": arr(320, np.int32), "num_images_per_prompt": arr(3, np.int32)}
    options = check_options(raw, CPU)
    assert options.seeds == [7, 8, 9] and options.do_classifier_free_guidance
    assert (options.height, options.width, options.num_inference_steps) == (128, 320, 2)


BAD_OPTIONS = [
    ("num_inference_steps", arr(0, np.int32), "an integer from 1 to 8"),
    ("num_inference_steps", arr(9, np.int32), "an integer from 1 to 8"),
    ("guidance_scale", arr(-1, np.float32), "a number from 0 to 20"),
    ("guidance_scale", arr(np.nan, np.float32), "a number from 0 to 20"),
    ("guidance_scale", arr(np.inf, np.float32), "a number from 0 to 20"),
    ("height", arr(200, np.int32), "a multiple of 64 from 128 to 1536"),
    ("height", arr(64, np.int32), "a multiple of 64 from 128 to 1536"),
    ("width", arr(1600, np.int32), "a multiple of 64 from 128 to 1536"),
    ("width", arr(-64, np.int32), "a multiple of 64 from 128 to 1536"),
    ("num_images_per_prompt", arr(0, np.int32), "an integer from 1 to 4"),
    ("num_images_per_prompt", arr(5, np.int32), "an integer from 1 to 4"),
    ("seed", arr(-1, np.int64), "an integer from 0 to 2**63 - 1"),
    ("seed", np.array([1, 2], np.int64), "exactly one value"),
]


@pytest.mark.parametrize("name,value,accepted", BAD_OPTIONS, ids=[f"{n}={v.tolist()}" for n, v, _ in BAD_OPTIONS])
def test_bad_option(name, value, accepted):
    with pytest.raises(InvalidInput) as error:
        check_options({name: value}, CPU)
    assert error.value.name == name
    assert str(error.value).startswith(f"{name}: ")
    assert accepted in str(error.value)
    if value.size == 1:
        assert str(error.value).startswith(f"{name}: {value.item()!r} is not accepted; expected ")


def test_seed_plus_images_must_fit_int64():
    raw = {"seed": arr(2**63 - 2, np.int64), "num_images_per_prompt": arr(3, np.int32)}
    with pytest.raises(InvalidInput, match=r"seed: .* expected an integer from 0 to 2\*\*63 - 3 \(image i uses seed \+ i\)"):
        check_options(raw, CPU)
    check_options({**raw, "num_images_per_prompt": arr(2, np.int32)}, CPU)


def test_production_sizes_start_at_512():
    with pytest.raises(InvalidInput, match="height: 256 is not accepted; expected a multiple of 64 from 512 to 1536"):
        check_options({"height": arr(256, np.int32)}, Limits())


def test_missing_prompt():
    with pytest.raises(InvalidInput, match=r"^prompt: missing; expected a UTF-8 string \(BYTES, shape \[1\]\); this input is required$"):
        check_prompts({})


def test_non_utf8_prompt():
    with pytest.raises(InvalidInput, match=r"prompt: b'\\xff\\xfea' is not accepted; expected UTF-8 text"):
        check_prompts({"prompt": np.array([b"\xff\xfea"], dtype=object)})
    with pytest.raises(InvalidInput, match="negative_prompt: .* expected UTF-8 text"):
        check_prompts({"prompt": np.array([b"ok"], dtype=object), "negative_prompt": np.array([b"\xc3"], dtype=object)})


def test_two_prompts_in_one_request():
    with pytest.raises(InvalidInput, match=r"prompt: '<2 values, shape \[2\]>' is not accepted; expected exactly one value"):
        check_prompts({"prompt": np.array([b"a", b"b"], dtype=object)})


def test_guidance_boundaries():
    assert check_guidance(arr(1.0, np.float32)) == 1.0 and check_guidance(None) == DEFAULTS["guidance_scale"]
    assert check_guidance(arr(0.0, np.float32)) == 0.0 and check_guidance(arr(20.0, np.float32)) == 20.0


@pytest.mark.parametrize("parameters,message", [
    ({"min_size": "100"}, "min_size=100, max_size=1536: expected multiples of 64"),
    ({"min_size": "1024", "max_size": "512"}, "expected multiples of 64 with min_size <= max_size"),
    ({"max_images": "0"}, "max_images=0: expected at least 1"),
    ({"max_images": "four"}, "max_images='four': expected an integer"),
])
def test_limits_from_bad_parameters(parameters, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Limits.from_parameters(parameters)


def test_prompt_size_limit():
    limits = Limits(max_prompt_bytes=8)
    assert check_prompts({"prompt": np.array(["é" * 4], dtype=object)}, limits) == ("é" * 4, "")  # 8 bytes
    with pytest.raises(InvalidInput, match=r"^prompt: '<10 bytes>' is not accepted; expected UTF-8 text of at most 8 bytes \(max_prompt_bytes\)$"):
        check_prompts({"prompt": np.array(["é" * 5], dtype=object)}, limits)
    with pytest.raises(InvalidInput, match=r"^negative_prompt: '<9 bytes>' .* at most 8 bytes"):
        check_prompts({"prompt": np.array([b"a"], dtype=object), "negative_prompt": np.array([b"x" * 9], dtype=object)}, limits)
    big = np.array([b"x" * 1_000_000], dtype=object)
    with pytest.raises(InvalidInput, match=r"^prompt: '<1000000 bytes>'"):
        check_prompts({"prompt": big})  # the default 4096


def test_preview_every():
    from contract.limits import Limits
    from serving.endpoint import InvalidInput, check_preview_every

    assert check_preview_every(None, Limits()) == 0 and check_preview_every(np.array([2], np.int32), Limits()) == 2
    for bad in (np.array([-1], np.int32), np.array([9], np.int32), np.array([1.5], np.float32), np.array([1, 2], np.int32)):
        with pytest.raises(InvalidInput, match="preview_every"):
            check_preview_every(bad, Limits())
