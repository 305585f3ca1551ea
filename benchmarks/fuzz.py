"""Property-based fuzzing of the public endpoint `ensemble_sdxl` on a real tritonserver (hypothesis).

    python -m benchmarks.fuzz [--examples 3000] [--out build/results/fuzz] [--skip-crash-check]

The generators live here and `tests/test_fuzz.py` runs them briefly against the test suite's server;
this module runs them at length against a server of its own (the tiny SDXL exported into a temporary
repository, CPU variant, as tests/conftest.py does). Each class of request (`strategies()`; its
share of a run in `WEIGHTS`, the variants every run covers in `VARIANTS`) is a hypothesis strategy
of `Case`s: the request (typed tritonclient inputs over HTTP or gRPC, a raw HTTP body and headers, or
raw gRPC protobuf bytes) and the answers it may get (`Outcome`s), computed from the endpoint's
contract (README, "The endpoint") and the served limits, not from the serving code. The property,
for every case:

- a bad request is refused: HTTP 4xx or gRPC INVALID_ARGUMENT, with a message naming what is wrong
  (the input, and the value where there is one); a request that is valid (or that Triton makes
  valid, see `TRITON_QUIRKS`) gets its images, `seeds` = seed + i;
- no 5xx and no gRPC INTERNAL, except Triton's own answers in `TRITON_5XX` (the explicit allow-list,
  each with its exact message) to requests that never reach a model of this repository;
- no hang (every call has a timeout) and the server stays ready; after the run, a fixed request
  (`REFERENCE`) gives exactly the image bytes it gave before.

Known findings are kept, not hidden: `TRITON_QUIRKS` lists what Triton 2.51 accepts or rewrites
before a model sees it; `SERVING_BUGS` names the classes that fail today because of this repository's
serving code (the test marks them xfail, strict); `KNOWN_TRITON_CRASH` is a request that kills
tritonserver 2.51 (its HTTP frontend sizes a buffer from the JSON `shape` before reading `data`), never
sent during the fuzzing: the benchmark sends it last, to its own server, to show whether it still does
(--skip-crash-check: do not).

Results: OUT.json (every count, answer seen and failure with its reproducer) and OUT.md (tables), by
default build/results/fuzz.{json,md}, or under $BENCH_RESULTS when set; BENCH_RESULTS=benchmarks/results
(or --out benchmarks/results/fuzz) refreshes the committed ones.
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.client
import json
import math
import os
import platform
import re
import shlex
import shutil
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from benchmarks.measure import bench_parser, bench_server, results_env, save_results
from contract.limits import Limits
from serving.admission import MAX_QUEUE_TIMEOUT_MS, QUEUE_TIMEOUT_PARAMETER  # the request parameter a client may set
from serving.endpoint import ENDPOINT_INPUTS, INPUTS, MAX_GUIDANCE, MODEL_NAME, SEED_MAX

ENSEMBLE_INPUTS = len(ENDPOINT_INPUTS)  # what ensemble_sdxl's config declares

TIMEOUT_S = 60  # per call: a valid request here takes well under a second; a hang is a failure
DECLARED = {i.name: ("BYTES" if i.dtype == "STRING" else i.dtype) for i in INPUTS}  # the endpoint's inputs
INT_INPUTS = ("num_inference_steps", "height", "width", "num_images_per_prompt")  # INT32
TEXT_INPUTS = ("prompt", "negative_prompt")
# The variants of a class that every run covers (tests/test_fuzz.py runs each on its own): the input a
# typed class breaks, or what a raw class breaks. Classes not listed have one variant, None.
VARIANTS = {
    "wrong_datatype": sorted(DECLARED), "wrong_shape": sorted(DECLARED), "int_out_of_range": INT_INPUTS + ("seed",),
    "invalid_utf8_text": TEXT_INPUTS, "oversize_text": TEXT_INPUTS, "json_invalid_utf8": TEXT_INPUTS,
    "json_int_wrap": INT_INPUTS + ("seed",),
    "json_malformed": ("truncated", "trailing", "surrogate", "garbage", "empty"),
    "json_structure": ("root", "no inputs", "inputs type", "inputs empty", "input type", "member missing", "member type",
                       "shape type", "shape element", "datatype unknown", "data missing", "data type", "data element",
                       "data count", "duplicate", "parameters type", "parameter value", "parameter known", "id type",
                       "outputs type", "output no name", "output unknown", "data nested"),
    "binary_header_length": ("zero", "letters", "negative", "beyond body", "huge", "inside header", "digits then letters",
                             "into binary", "wrapped"),
    "binary_payload": ("truncated", "extra bytes", "size lies", "negative size", "string length lies", "two strings", "no string"),
    "http_parameter_utf8": ("queue_timeout_ms value", "other value", "key"),
    "grpc_raw_contents": ("byte size", "fewer contents", "more contents", "string length lies", "contents and raw"),
    "grpc_unparsable": ("input name", "datatype", "id", "parameter key", "parameter value", "output name", "model version"),
}
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
try:  # tritonclient takes BF16 arrays as ml_dtypes.bfloat16 only
    import ml_dtypes

    NUMPY["BF16"] = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    pass
PACK = {"INT32": "<i", "INT64": "<q", "FP32": "<f"}
JSON_WS = b" \t\n\r"  # what rapidjson skips between tokens
NO_NUL = st.characters(codec="utf-8", exclude_characters="\x00")  # text that Triton keeps whole (names...)

# The fixed request whose image must not change across the fuzzing.
REFERENCE = dict(prompt=b"a red cube", seed=7, height=128, width=128, num_inference_steps=2)

# Triton 2.51's own 5xx answers, allow-listed: each answers a request that never reaches a model of
# this repository (the HTTP frontend refuses the body before any model runs, gRPC's protobuf layer
# the bytes before Triton sees them), so the repository cannot change them. key -> (status, the exact
# message, with only its variable parts as patterns). A case says which key it may get and, through
# Outcome.contains, the variable parts it expects (the JSON member named, rapidjson's message).
TRITON_5XX = {
    # HTTP body that is not JSON (rapidjson's message and byte offset)
    "json_parse": ("500", r"failed to parse the request JSON buffer: [^\n]+\. at \d+"),
    # JSON whose member has the wrong JSON type, or lacks a required member: the member is named
    "json_member": ("500", r"Unable to parse '[a-z_]+': attempt to access (non-existing object member '[a-z_]+'"
                           r"|JSON non-(array as array|string as string|unsigned-integer as unsigned-integer"
                           r"|signed-integer as signed-integer|number as double|boolean as boolean))"),
    # `data` with another element count than `shape` says
    "json_data_shape": ("500", r"Unable to parse 'data': Shape does not match true shape of 'data' field"),
    # a BYTES input whose `data` holds a non-string
    "json_bytes": ("500", r"Unable to parse JSON bytes array: attempt to access JSON non-string as string"),
    # request `parameters` that is not an object
    "json_parameters": ("500", r"failed to get request params\.: attempt to get members for non-object"),
    # gRPC: bytes that are not a ModelInferRequest (here: invalid UTF-8 in a protobuf string field)
    "grpc_parse": ("INTERNAL", r"Unable to parse request"),
}

# What Triton 2.51 accepts or rewrites before a model sees it (measured; the cases expect it):
TRITON_QUIRKS = {
    "json_int_wrap": "HTTP JSON `data` for an INT32 input outside the int32 range (within int64) is wrapped modulo "
                     "2**32 without an error: height 4294967424 arrives as 128 and is served",
    "input_name_nul": "an input name with a NUL byte is cut at the NUL (both protocols): 'height\\x00junk' is taken as "
                      "'height'",
    "grpc_extra_raw_contents": "gRPC raw_input_contents beyond the inputs are ignored: the request is served",
    "json_nested_data": "HTTP JSON `data` nested deeper than `shape` ([[128]] for shape [1]) is flattened and served",
    "header_length_int32": "the Inference-Header-Content-Length header is read as C's atoi (leading digits, then cut to 32 "
                           "bits): the true length plus k * 2**32 is served, 2**32 means no JSON header at all, '12abc' is 12",
}

# Classes that fail today because of this repository's serving code (tests/test_fuzz.py marks them
# xfail, strict, so that a fix shows up): class -> what goes wrong. None today.
SERVING_BUGS: dict[str, str] = {}
# What the fuzzing found in the serving code, fixed since; their classes keep checking it.
FIXED_SERVING_BUGS = {
    "http_parameter_utf8": "an HTTP request parameter (key or string value) with invalid UTF-8 bytes made the "
                           "tokenizer's request.parameters() raise: HTTP 500 \"tokenizer: internal error: "
                           "UnicodeDecodeError ...\"; now 400 \"parameters: 'UnicodeDecodeError' is not accepted; expected "
                           "request parameters in UTF-8\"",
    "queue_timeout_idle": "a valid request with queue_timeout_ms 1 or 2 on an idle server got HTTP 503 / UNAVAILABLE "
                          "\"waited 3 ms for a denoising slot, over its queue_timeout_ms=1; retry later\": the wait ran from "
                          "the tokenizer's admission to the scheduler's start (tokenizer and text encoder included; up to "
                          "about 10 ms refused here); now a request admitted while a loop is free is not timed",
}

# Kills tritonserver 2.51: its HTTP frontend sizes a buffer from the JSON `shape` before it reads
# `data`. Past the machine's memory (here 24 GiB: INT64 [3 * 2**30] and up, [2**40] on any machine) the
# allocation throws std::bad_alloc, uncaught: "terminate called ...", SIGABRT; where the byte size
# overflows 64 bits ([2**61], [2**62]) it is a SIGSEGV. [2**31] (16 GiB) still gets a 500 here. gRPC and
# HTTP binary requests with the same shapes get a 400. Never part of the fuzzing (its shapes hold at
# most 27 elements); see run_crash_check.
KNOWN_TRITON_CRASH = json.dumps({"inputs": [
    {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a red cube"]},
    {"name": "seed", "datatype": "INT64", "shape": [2**40], "data": [1]}]}).encode()


# --------------------------------------------------------------------------------------------------
# Cases, answers and the judgement


@dataclass(frozen=True, eq=False)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray


@dataclass(frozen=True)
class Outcome:
    """One answer a case may get. kind: ok (HTTP 200 / gRPC OK), refused (HTTP 4xx / gRPC
    INVALID_ARGUMENT), triton (the allow-listed Triton 5xx `key`)."""

    kind: str
    contains: tuple[str, ...] = ()  # substrings of the message (refused, triton)
    key: str = ""  # TRITON_5XX key (triton)
    images: tuple[int, ...] | None = None  # (n, h, w, 3) (ok)
    seeds: tuple[int, ...] | None = None  # expected seeds, when the request set one (ok)


def ok(n: int, height: int, width: int, seed: int | None) -> Outcome:
    return Outcome("ok", images=(n, height, width, 3), seeds=None if seed is None else tuple(seed + i for i in range(n)))


def refused(*contains: str) -> Outcome:
    return Outcome("refused", contains=tuple(contains))


def triton(key: str, *contains: str) -> Outcome:
    return Outcome("triton", key=key, contains=tuple(contains))


@dataclass(frozen=True, eq=False)
class Case:
    kind: str  # the class (CLASSES)
    transport: str  # http, grpc (tritonclient), raw-http (http.client), raw-grpc (protobuf bytes)
    expect: tuple[Outcome, ...]
    tensors: tuple[Tensor, ...] = ()  # http, grpc
    binary: bool = True  # http: binary tensor data, else JSON
    parameters: dict | None = None  # http, grpc: request parameters
    body: bytes = b""  # raw-http body, raw-grpc serialized ModelInferRequest
    headers: tuple[tuple[str, str], ...] = ()  # raw-http
    note: str = ""  # what the generator broke, for reports


@dataclass
class Answer:
    status: str  # "200", "400", "500"... (HTTP); "OK", "INVALID_ARGUMENT", "INTERNAL"... (gRPC); or
    # "no response" (connection closed), "timeout", "client error" (the request could not be built)
    message: str = ""
    images: tuple[int, ...] | None = None  # shape of `images`
    seeds: tuple[int, ...] | None = None
    seconds: float = 0.0


def _matches(outcome: Outcome, answer: Answer) -> bool:
    if outcome.kind == "ok":
        return (answer.status in ("200", "OK") and answer.images == outcome.images
                and (outcome.seeds is None or answer.seeds == outcome.seeds)
                and answer.seeds is not None and len(answer.seeds) == outcome.images[0])
    if outcome.kind == "refused":
        is_refusal = answer.status.startswith("4") or answer.status == "INVALID_ARGUMENT"
        return is_refusal and all(text in answer.message for text in outcome.contains)
    status, pattern = TRITON_5XX[outcome.key]
    return (answer.status == status and re.fullmatch(pattern, answer.message) is not None
            and all(text in answer.message for text in outcome.contains))


def judge(case: Case, answer: Answer) -> tuple[str, str | None]:
    """(label, problem): label counts the answer (ok, refused, triton-5xx:<key>, or unexpected);
    problem is None when the answer is one the case expects."""
    for outcome in case.expect:
        if _matches(outcome, answer):
            return ("triton-5xx:" + outcome.key if outcome.kind == "triton" else outcome.kind), None
    wanted = " or ".join(_describe_outcome(o) for o in case.expect)
    return "unexpected", f"expected {wanted}; got {answer.status} {answer.message[:400]!r}" + (
        f" images {answer.images} seeds {answer.seeds}" if answer.images else "")


def _describe_outcome(outcome: Outcome) -> str:
    if outcome.kind == "ok":
        return f"OK with images {outcome.images}" + (f" seeds {list(outcome.seeds)}" if outcome.seeds else "")
    if outcome.kind == "refused":
        return "4xx/INVALID_ARGUMENT containing " + " and ".join(repr(c) for c in outcome.contains)
    status, pattern = TRITON_5XX[outcome.key]
    return f"allow-listed {status} {outcome.key} /{pattern}/" + "".join(f" containing {c!r}" for c in outcome.contains)


def _short(data: bytes, limit: int = 120) -> str:
    return repr(data) if len(data) <= limit else f"<{len(data)} bytes: {data[:limit]!r}...>"


def describe(case: Case, limit: int = 120) -> str:
    """A reproducer a person can read (long bytes shortened; `reproducer` has them all)."""
    if case.transport in ("http", "grpc"):
        def value(t: Tensor) -> str:
            items = t.array.reshape(-1).tolist()
            shown = [_short(v, limit) if isinstance(v, bytes) else repr(v) for v in items[:4]]
            return "[" + ", ".join(shown) + (", ..." if len(items) > 4 else "") + "]"

        inputs = ", ".join(f"{t.name!r} {t.datatype} {list(t.array.shape)} {value(t)}" for t in case.tensors)
        extra = (f" binary_data={case.binary}" if case.transport == "http" else "") + (
            f" parameters={case.parameters!r}" if case.parameters else "")
        return f"{case.transport} infer {MODEL_NAME}{extra}: {inputs}"
    if case.transport == "raw-http":
        headers = "".join(f" -H '{k}: {v}'" for k, v in case.headers)
        return f"POST /v2/models/{MODEL_NAME}/infer{headers} body={_short(case.body, 3 * limit)}"
    return f"gRPC ModelInfer raw bytes={_short(case.body, 3 * limit)}"


def _json_safe(value):
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else value


def reproducer(case: Case) -> dict:
    """Everything needed to send the case again (bytes in base64)."""
    out = {"class": case.kind, "transport": case.transport, "note": case.note, "described": describe(case)}
    if case.transport in ("http", "grpc"):
        out["inputs"] = [{"name": t.name, "datatype": t.datatype, "shape": list(t.array.shape),
                          "values": [_json_safe(v) for v in t.array.reshape(-1).tolist()]} for t in case.tensors]
        out["binary_data"], out["parameters"] = case.binary, case.parameters
    else:
        out["body_base64"] = base64.b64encode(case.body).decode()
        out["headers"] = dict(case.headers)
    return out


# --------------------------------------------------------------------------------------------------
# Building requests


def tensor(name: str, datatype: str, values, shape=None) -> Tensor:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    array = np.empty(len(values), dtype=object) if datatype == "BYTES" else None
    if datatype == "BYTES":
        array[:] = values
    else:
        array = np.array(values, dtype=NUMPY[datatype])
    return Tensor(name, datatype, array.reshape([len(values)] if shape is None else shape))


def endpoint_tensor(name: str, value) -> Tensor:
    return tensor(name, DECLARED[name], [value])


def served_limits(http_url: str, admin: dict[str, str]) -> Limits:
    """The served deployment's limits: the scheduler's and the tokenizer's config parameters (model
    configs are an admin API: `admin` carries the key)."""
    parameters = {}
    for model in ("scheduler", "tokenizer"):
        request = urllib.request.Request(f"http://{http_url}/v2/models/{model}/config", headers=admin)
        with urllib.request.urlopen(request, timeout=10) as response:
            config = json.loads(response.read())
        parameters.update({k: v["string_value"] for k, v in config.get("parameters", {}).items()})
    return Limits.from_parameters(parameters)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def wrap_int32(value: int) -> int:
    return (value + 2**31) % 2**32 - 2**31


def unknown_input_refused(name: str, count: int) -> Outcome:
    """Triton's answer to an input the endpoint does not declare, among `count` inputs: past the
    declared count it says so first (listing the names), else it names the unknown input."""
    if count > ENSEMBLE_INPUTS:  # all of ensemble_sdxl's inputs, not only those the fuzzing sends
        return refused(f"expected number of inputs between 0 and {ENSEMBLE_INPUTS} but got {count} inputs for model '{MODEL_NAME}'",
                       f"'{name}'")
    return refused(f"unexpected inference input '{name}' for model '{MODEL_NAME}'")


def int_accepted(name: str, value: int, limits: Limits) -> bool:
    if name == "num_inference_steps":
        return limits.min_steps <= value <= limits.max_steps
    if name == "num_images_per_prompt":
        return 1 <= value <= limits.max_images
    return limits.min_size <= value <= limits.max_size and value % limits.size_multiple == 0


def int_accepted_text(name: str, limits: Limits) -> str:
    if name == "num_inference_steps":
        return f"expected an integer from {limits.min_steps} to {limits.max_steps}"
    if name == "num_images_per_prompt":
        return f"expected an integer from 1 to {limits.max_images}"
    return f"expected a multiple of {limits.size_multiple} from {limits.min_size} to {limits.max_size}"


# --------------------------------------------------------------------------------------------------
# Strategies


def _pick(draw, options):
    return draw(st.sampled_from(list(options)))


def _texts(max_bytes: int) -> st.SearchStrategy[bytes]:
    """Valid UTF-8 texts up to max_bytes: short odd ones (NUL, emoji, CLIP's special tokens...) and
    long ones up to the limit exactly."""
    short = st.text(st.characters(codec="utf-8"), max_size=24).map(lambda s: s.encode("utf-8"))
    special = st.sampled_from([b"", b" ", b"<|endoftext|>", b"<|startoftext|>a<|endoftext|>", b"\x00", "\U0001f431 cat".encode(),
                               "\u202e\u200b\ufeff".encode(), b"a" * 77, b"photo, " * 30])
    at_limit = st.builds(lambda unit, n: (unit * (n // len(unit) + 1))[:n],
                         st.sampled_from([b"a", b"cat ", b"1,"]), st.integers(max_bytes - 8, max_bytes))
    multibyte = st.builds(lambda ch, n: ch * n, st.sampled_from(["\u00e9", "\u732b", "\U0001f431"]),
                          st.integers(1, 1000)).map(lambda s: s.encode("utf-8")).filter(lambda b: len(b) <= max_bytes)
    return st.one_of(short, short, special, at_limit, multibyte)


def _invalid_utf8(max_bytes: int) -> st.SearchStrategy[bytes]:
    small = st.binary(min_size=1, max_size=48).filter(lambda b: not is_utf8(b))
    classic = st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
                               b"\xe2\x82", b"caf\xe9", b"a\x00\xff"])
    tail = st.builds(lambda n, bad: b"a" * n + bad, st.integers(0, max_bytes - 4), st.sampled_from([b"\xff", b"\xe2\x82", b"\xc3"]))
    return st.one_of(small, classic, tail)


def _guidance_valid() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([0.0, -0.0, 1.0, 1.5, 2.0, MAX_GUIDANCE]),
                     st.floats(0.0, MAX_GUIDANCE, width=32), st.floats(0.0, 1.0000000031710769e-30, width=32))


@st.composite
def _valid(draw, limits: Limits, max_bytes: int) -> tuple[dict, Outcome]:
    """A valid, cheap request: small sizes and 1 or 2 steps always set; the rest set or not. ->
    (values by input name, its outcome)."""
    sizes = (limits.min_size, limits.min_size + limits.size_multiple)
    values = {"prompt": draw(_texts(max_bytes)), "height": draw(st.sampled_from(sizes)), "width": draw(st.sampled_from(sizes)),
              "num_inference_steps": draw(st.integers(limits.min_steps, min(2, limits.max_steps)))}
    n = 1
    if draw(st.booleans()):
        n = values["num_images_per_prompt"] = draw(st.integers(1, min(2, limits.max_images)))
    if draw(st.booleans()):
        values["seed"] = draw(st.one_of(st.integers(0, 2**32), st.integers(0, SEED_MAX - (n - 1)),
                                        st.sampled_from([0, SEED_MAX - (n - 1)])))
    if draw(st.booleans()):
        values["guidance_scale"] = draw(_guidance_valid())
    if draw(st.booleans()):
        values["negative_prompt"] = draw(_texts(max_bytes))
    return values, ok(n, values["height"], values["width"], values.get("seed"))


def _typed(kind: str, tensors, expect, draw, parameters=None, binary: bool | None = None, note: str = "") -> Case:
    """A tritonclient case over HTTP or gRPC; over HTTP, JSON data where tritonclient can send it."""
    transport = _pick(draw, ["http", "grpc"])
    json_ok = all((t.datatype != "BYTES" or all(is_utf8(v) for v in t.array.reshape(-1))) and t.datatype != "BF16"
                  for t in tensors)  # what tritonclient sends as JSON (FP16 it sends, and Triton refuses)
    if binary is None:
        binary = True if (transport == "grpc" or not json_ok) else draw(st.booleans())
    return Case(kind, transport, tuple(expect), tensors=tuple(tensors), binary=binary, parameters=parameters, note=note)


def _values_tensors(values: dict) -> list[Tensor]:
    return [endpoint_tensor(name, value) for name, value in values.items()]


def strategies(limits: Limits) -> dict:
    """Every class of request -> `strategy(variant=None)`, its strategy of Cases (of that variant, or
    of any), for a deployment with these limits."""
    max_bytes = limits.max_prompt_bytes
    valid = _valid(limits, max_bytes)
    classes = {}

    @st.composite
    def valid_small(draw, variant=None):
        values, outcome = draw(valid)
        # 0: no limit. A short limit is refused even on an idle server (the wait counts the text encoder), so
        # the valid ones here leave 10 s.
        parameters = ({QUEUE_TIMEOUT_PARAMETER: draw(st.one_of(st.just(0), st.integers(10_000, MAX_QUEUE_TIMEOUT_MS)))}
                      if draw(st.booleans()) else None)
        return _typed("valid_small", _values_tensors(values), [outcome], draw, parameters=parameters)

    classes["valid_small"] = valid_small

    @st.composite
    def wrong_datatype(draw, variant=None):
        values, _ = draw(valid)
        name = variant or _pick(draw, VARIANTS["wrong_datatype"])
        datatype = _pick(draw, sorted(set(NUMPY) - {DECLARED[name]}))
        if datatype == "BYTES":
            value = draw(st.one_of(st.binary(max_size=8), st.just(b"128")))
        elif datatype == "BOOL":
            value = draw(st.booleans())
        elif datatype.startswith(("FP", "BF")):
            value = draw(st.floats(-1e3, 1e3, width=16) | st.sampled_from([128.0, 1.0, float("nan")]))
        else:
            info = np.iinfo(NUMPY[datatype])
            value = draw(st.integers(int(info.min), int(info.max)) | st.sampled_from([1, 2, 128]))
        values.pop(name, None)
        tensors = _values_tensors(values) + [tensor(name, datatype, [value])]
        case = _typed("wrong_datatype", tensors, [], draw)
        if case.transport == "http" and not case.binary and datatype == "FP16":  # Triton takes FP16 in binary only
            expect = refused(f"receiving FP16 data via JSON is not supported. Please use the binary data format for input {name}")
        else:
            expect = refused(f"inference input '{name}' data-type is '{datatype}', but model '{MODEL_NAME}' expects '{DECLARED[name]}'")
        return replace(case, expect=(expect,))

    classes["wrong_datatype"] = wrong_datatype

    @st.composite
    def wrong_shape(draw, variant=None):
        values, _ = draw(valid)
        name = variant or _pick(draw, VARIANTS["wrong_shape"])
        shape = draw(st.one_of(st.sampled_from([[0], [2], [1, 1], []]),
                               st.lists(st.integers(0, 3), max_size=3).filter(lambda s: s != [1])))
        count = int(np.prod(shape)) if shape else 1
        value = values.get(name, {"prompt": b"x", "negative_prompt": b"", "seed": 1, "guidance_scale": 1.0}.get(name, 128))
        values.pop(name, None)
        tensors = _values_tensors(values) + [tensor(name, DECLARED[name], [value] * count, shape)]
        got = ",".join(str(d) for d in shape)
        return _typed("wrong_shape", tensors,
                      [refused(f"unexpected shape for input '{name}' for model '{MODEL_NAME}'. Expected [1], got [{got}]")], draw)

    classes["wrong_shape"] = wrong_shape

    @st.composite
    def int_out_of_range(draw, variant=None):
        values, _ = draw(valid)
        name = variant or _pick(draw, VARIANTS["int_out_of_range"])
        int32 = (-2**31, 2**31 - 1)
        if name == "seed":
            n = values.get("num_images_per_prompt", 1)
            bad = st.integers(-2**63, -1) | st.just(-1)
            if n > 1:
                bad = bad | st.integers(SEED_MAX - n + 2, SEED_MAX)
            value = draw(bad)
            message = f"seed: {value} is not accepted; expected an integer from 0 to 2**63 - {n}"
        else:
            if name == "num_inference_steps":
                low, high = limits.min_steps, limits.max_steps
            elif name == "num_images_per_prompt":
                low, high = 1, limits.max_images
            else:
                low, high = limits.min_size, limits.max_size
            candidates = (st.integers(int32[0], low - 1) | st.integers(high + 1, int32[1])
                          | st.sampled_from([0, -1, low - 1, high + 1, int32[0], int32[1]]))
            if name in ("height", "width"):
                candidates = candidates | st.integers(low, high).filter(lambda v: v % limits.size_multiple)
            value = draw(candidates)
            message = f"{name}: {value} is not accepted; {int_accepted_text(name, limits)}"
        values[name] = value
        return _typed("int_out_of_range", _values_tensors(values), [refused(message)], draw)

    classes["int_out_of_range"] = int_out_of_range

    @st.composite
    def guidance_out_of_range(draw, variant=None):
        values, _ = draw(valid)
        value = draw(st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0, -1e-45, 20.000002, 3.4e38]),
                               st.floats(allow_nan=False, width=32, max_value=0.0).filter(lambda f: f < 0),
                               st.floats(min_value=MAX_GUIDANCE, width=32, exclude_min=True)))
        shown = float(np.float32(value))
        values["guidance_scale"] = value
        return _typed("guidance_out_of_range", _values_tensors(values),
                      [refused(f"guidance_scale: {shown!r} is not accepted; expected a number from 0 to {MAX_GUIDANCE:g}")], draw)

    classes["guidance_out_of_range"] = guidance_out_of_range

    @st.composite
    def missing_prompt(draw, variant=None):
        values, _ = draw(valid)
        del values["prompt"]
        return _typed("missing_prompt", _values_tensors(values),
                      [refused("prompt: missing; expected a UTF-8 string (BYTES, shape [1]); this input is required")], draw)

    classes["missing_prompt"] = missing_prompt

    @st.composite
    def unknown_input(draw, variant=None):
        values, _ = draw(valid)
        name = draw(st.one_of(st.text(NO_NUL, max_size=24),
                              st.sampled_from(["Prompt", "prompt ", "images", "seeds", "input_ids", "admission_ticket",
                                               "prompt_embeds", "guidance", "steps", ""])).filter(lambda s: s not in DECLARED))
        datatype = _pick(draw, ["BYTES", "INT32", "INT64", "FP32", "BOOL"])
        value = {"BYTES": b"x", "INT32": 1, "INT64": 1, "FP32": 1.0, "BOOL": True}[datatype]
        tensors = _values_tensors(values)
        tensors.insert(draw(st.integers(0, len(tensors))), tensor(name, datatype, [value]))
        return _typed("unknown_input", tensors, [unknown_input_refused(name, len(tensors))], draw)

    classes["unknown_input"] = unknown_input

    @st.composite
    def input_name_nul(draw, variant=None):
        # Triton cuts input names at a NUL (TRITON_QUIRKS): the case expects the answer to the cut name.
        values, _ = draw(valid)
        prefix = draw(st.one_of(st.sampled_from(sorted(DECLARED)), st.text(NO_NUL, max_size=8)))
        name = prefix + "\x00" + draw(st.text(st.characters(codec="utf-8"), max_size=8))
        if prefix in values:
            value, expect = values[prefix], refused(f"input '{prefix}' already exists in request")
        elif prefix in DECLARED:  # an optional input the request lacks, with a valid value: served
            value = {"negative_prompt": b"x", "seed": 3, "guidance_scale": 1.0, "num_images_per_prompt": 1}[prefix]
            served = {**values, prefix: value}
            expect = ok(served.get("num_images_per_prompt", 1), served["height"], served["width"], served.get("seed"))
        else:
            value, expect = b"x", unknown_input_refused(prefix, len(values) + 1)
        tensors = _values_tensors(values) + [tensor(name, DECLARED.get(prefix, "BYTES"), [value])]
        return _typed("input_name_nul", tensors, [expect], draw, note=TRITON_QUIRKS["input_name_nul"])

    classes["input_name_nul"] = input_name_nul

    @st.composite
    def invalid_utf8_text(draw, variant=None):
        values, _ = draw(valid)
        name = variant or _pick(draw, VARIANTS["invalid_utf8_text"])
        data = draw(_invalid_utf8(max_bytes))
        values[name] = data
        return _typed("invalid_utf8_text", _values_tensors(values),
                      [refused(f"{name}: {data[:40]!r} is not accepted; expected UTF-8 text (UnicodeDecodeError)")], draw)

    classes["invalid_utf8_text"] = invalid_utf8_text

    @st.composite
    def oversize_text(draw, variant=None):
        values, _ = draw(valid)
        name = variant or _pick(draw, VARIANTS["oversize_text"])
        size = draw(st.one_of(st.integers(max_bytes + 1, 4 * max_bytes), st.sampled_from([max_bytes + 1, 2**20])))
        unit = draw(st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from([b"a", "\u732b".encode(), b"\xff"])))
        data = (unit * (size // len(unit) + 1))[:size]
        values[name] = data
        return _typed("oversize_text", _values_tensors(values),
                      [refused(f"{name}: '<{size} bytes>' is not accepted; expected UTF-8 text of at most {max_bytes} bytes")], draw)

    classes["oversize_text"] = oversize_text

    @st.composite
    def request_parameter(draw, variant=None):
        values, _ = draw(valid)
        value = draw(st.one_of(st.integers(-2**63, -1), st.integers(MAX_QUEUE_TIMEOUT_MS + 1, 2**63 - 1), st.booleans(),
                               st.text(NO_NUL, max_size=12),
                               st.sampled_from([-1, MAX_QUEUE_TIMEOUT_MS + 1, "5", "", True])))
        return _typed("request_parameter", _values_tensors(values),
                      [refused(f"{QUEUE_TIMEOUT_PARAMETER}: {value!r} is not accepted")], draw,
                      parameters={QUEUE_TIMEOUT_PARAMETER: value})

    classes["request_parameter"] = request_parameter

    @st.composite
    def queue_timeout_idle(draw, variant=None):
        # a short queue timeout on an idle server, where nothing waits for a slot: served
        values, outcome = draw(valid)
        return _typed("queue_timeout_idle", _values_tensors(values), [outcome], draw,
                      parameters={QUEUE_TIMEOUT_PARAMETER: draw(st.integers(1, 2))})

    classes["queue_timeout_idle"] = queue_timeout_idle
    classes.update(_raw_http_strategies(limits, valid))
    classes.update(_raw_grpc_strategies(limits, valid))
    return classes


# -- raw HTTP: JSON bodies


def _json_input(name: str, value, datatype: str | None = None) -> dict:
    datatype = datatype or DECLARED[name]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return {"name": name, "datatype": datatype, "shape": [1], "data": [value]}


@st.composite
def _json_request(draw, valid) -> tuple[dict, dict, Outcome]:
    """A valid request as a KServe v2 JSON document (texts valid UTF-8): (document, values, outcome)."""
    values, outcome = draw(valid)
    document = {"inputs": [_json_input(name, value) for name, value in values.items()]}
    if draw(st.booleans()):
        document["id"] = draw(st.text(max_size=8))
    return document, values, outcome


def _dumps(document, draw) -> bytes:
    return json.dumps(document, ensure_ascii=draw(st.booleans())).encode("utf-8")


def _raw_http(kind: str, body: bytes, expect, headers=(), note: str = "") -> Case:
    headers = tuple(headers) or (("Content-Type", "application/json"),)
    return Case(kind, "raw-http", tuple(expect), body=body, headers=headers, note=note)


JSON_VALUES = {  # a JSON value of each type, for structure mutations
    "object": st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=2),
    "array": st.lists(st.integers(0, 9), max_size=2),
    "string": st.text(max_size=6),
    "integer": st.integers(-2**40, 2**40),
    "float": st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    "true": st.just(True), "false": st.just(False), "null": st.none(),
}


def _json_of(draw, *types: str):
    return draw(JSON_VALUES[_pick(draw, types)])


def _raw_http_strategies(limits: Limits, valid) -> dict:
    request = _json_request(valid)
    classes = {}

    @st.composite
    def json_malformed(draw, variant=None):
        document, values, _ = draw(request)
        body = _dumps(document, draw)
        how = variant or _pick(draw, VARIANTS["json_malformed"])
        if how == "truncated":  # a strict prefix of an object is never a document
            return _raw_http("json_malformed", body[:draw(st.integers(1, len(body) - 1))], [triton("json_parse")], note=how)
        if how == "trailing":  # a NUL ends rapidjson's input, whitespace is skipped: neither starts the junk
            junk = draw(st.binary(min_size=1, max_size=16).filter(lambda b: b[0] not in JSON_WS + b"\x00"))
            return _raw_http("json_malformed", body + junk,
                             [triton("json_parse", "The document root must not be followed by other values")], note=how)
        if how == "surrogate":  # a JSON \\u escape of a lone UTF-16 surrogate
            escape = draw(st.sampled_from(["\\ud800", "\\udbff", "\\ud800\\u0041", "\\ud83d"]))
            body = json.dumps({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["SURROGATE"]}]}).encode()
            body = body.replace(b"SURROGATE", b"a" + escape.encode() + b"b")
            return _raw_http("json_malformed", body, [triton("json_parse", "The surrogate pair in string is invalid")], note=how)
        if how == "garbage":  # bytes that cannot start a JSON value, or only whitespace/NUL: "document is empty"
            start = draw(st.integers(0, 255).filter(lambda b: b not in b'{["-0123456789tfn' + JSON_WS))
            rest = draw(st.binary(max_size=32))
            blank = draw(st.binary(min_size=1, max_size=4).map(lambda b: bytes(JSON_WS[x % 4] for x in b)))
            if start == 0:
                return _raw_http("json_malformed", blank + b"\x00" + rest, [triton("json_parse", "The document is empty")], note=how)
            return _raw_http("json_malformed", bytes([start]) + rest, [triton("json_parse", "Invalid value")], note=how)
        # no body and no Inference-Header-Content-Length: Triton takes it for a raw binary tensor
        return _raw_http("json_malformed", b"", [refused(f"Raw request must only have 1 input (found 1) to be deduced but got {ENSEMBLE_INPUTS} inputs")],
                         note=how)

    classes["json_malformed"] = json_malformed

    @st.composite
    def json_invalid_utf8(draw, variant=None):
        # invalid UTF-8 bytes inside a JSON string: rapidjson passes them on; the tokenizer refuses them
        document, values, _ = draw(request)
        name = variant or _pick(draw, VARIANTS["json_invalid_utf8"])
        data = draw(st.lists(st.one_of(st.integers(0x80, 0xFF), st.integers(0x20, 0x7E).filter(lambda b: b not in b'"\\')),
                             min_size=1, max_size=40).map(bytes).filter(lambda b: not is_utf8(b)))
        document["inputs"] = [i for i in document["inputs"] if i["name"] != name] + [_json_input(name, "__FUZZ_MARKER__")]
        body = _dumps(document, draw).replace(b'"__FUZZ_MARKER__"', b'"' + data + b'"')
        return _raw_http("json_invalid_utf8", body, [refused(f"{name}: {data[:40]!r} is not accepted; expected UTF-8 text")])

    classes["json_invalid_utf8"] = json_invalid_utf8

    @st.composite
    def json_structure(draw, variant=None):
        """Valid JSON, wrong structure: one mutation, with the answer Triton gives to it."""
        document, values, outcome = draw(request)
        inputs = document["inputs"]
        i = draw(st.integers(0, len(inputs) - 1))
        target = inputs[i]
        how = variant or _pick(draw, VARIANTS["json_structure"])
        expect = None
        if how == "root":
            document = _json_of(draw, "array", "string", "integer", "float", "true", "false", "null")
            expect = triton("json_member", "Unable to parse 'inputs': attempt to access non-existing object member 'inputs'")
        elif how == "no inputs":
            del document["inputs"]
            expect = triton("json_member", "Unable to parse 'inputs': attempt to access non-existing object member 'inputs'")
        elif how == "inputs type":
            document["inputs"] = _json_of(draw, "object", "string", "integer", "float", "true", "false", "null")
            expect = triton("json_member", "Unable to parse 'inputs': attempt to access JSON non-array as array")
        elif how == "inputs empty":
            document["inputs"] = []
            expect = refused("prompt: missing; expected a UTF-8 string")
        elif how == "input type":
            inputs[i] = _json_of(draw, "array", "string", "integer", "float", "true", "false", "null")
            expect = refused("Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
                             "'shared_memory_region' in 'parameters'. But no field is set")
        elif how == "member missing":
            key = _pick(draw, ["name", "datatype", "shape"])
            del target[key]
            expect = triton("json_member", f"Unable to parse '{key}': attempt to access non-existing object member '{key}'")
        elif how == "member type":
            key = _pick(draw, ["name", "datatype"])
            target[key] = _json_of(draw, "object", "array", "integer", "float", "true", "false", "null")
            expect = triton("json_member", f"Unable to parse '{key}': attempt to access JSON non-string as string")
        elif how == "shape type":
            target["shape"] = _json_of(draw, "object", "string", "integer", "float", "true", "false", "null")
            expect = triton("json_member", "Unable to parse 'shape': attempt to access JSON non-array as array")
        elif how == "shape element":
            target["shape"] = [draw(st.one_of(JSON_VALUES["object"], JSON_VALUES["array"], JSON_VALUES["string"],
                                              st.integers(-2**40, -1), JSON_VALUES["float"], st.booleans(), st.none(),
                                              st.sampled_from([1.0, -1])))]
            expect = triton("json_member", "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer")
        elif how == "datatype unknown":
            target["datatype"] = draw(st.one_of(st.sampled_from(["int32", "Bytes", "STRING", "TYPE_INT32", "FP8", "", "UINT128"]),
                                                st.text(NO_NUL, max_size=6)).filter(
                                                    lambda d: d not in NUMPY and d != "BF16"))
            expect = refused(f"invalid datatype for input {target['name']}")
        elif how == "data missing":
            del target["data"]
            expect = refused("Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
                             "'shared_memory_region' in 'parameters'. But no field is set")
        elif how == "data type":
            target["data"] = _json_of(draw, "object", "string", "integer", "float", "true", "false", "null")
            expect = triton("json_member", "Unable to parse 'data': attempt to access JSON non-array as array")
        elif how == "data element":
            datatype = target["datatype"]
            if datatype == "BYTES":
                target["data"] = [_json_of(draw, "object", "integer", "float", "true", "false", "null")]
                expect = triton("json_bytes")
            elif datatype == "FP32":
                target["data"] = [_json_of(draw, "object", "string", "true", "false", "null")]
                expect = triton("json_member", "Unable to parse 'data': attempt to access JSON non-number as double")
            else:
                target["data"] = [draw(st.one_of(JSON_VALUES["object"], JSON_VALUES["string"], JSON_VALUES["float"], st.booleans(),
                                                 st.none(), st.integers(2**63, 2**64 - 1), st.sampled_from([128.0, 1.0])))]
                expect = triton("json_member", "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer")
        elif how == "data count":
            shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=2))
            count = draw(st.integers(0, 6).filter(lambda c: c != int(np.prod(shape))))
            target["shape"], target["data"] = shape, target["data"] * count
            expect = triton("json_data_shape")
            if target["datatype"] == "BYTES":  # Triton counts the strings later: a 400 naming the input
                expect = refused(f"input '{target['name']}'")
            elif not np.prod(shape):  # no elements: Triton does not read `data`; the shape is refused
                got = ",".join(map(str, shape))
                expect = refused(f"unexpected shape for input '{target['name']}' for model '{MODEL_NAME}'. Expected [1], got [{got}]")
        elif how == "duplicate":
            inputs.insert(draw(st.integers(0, len(inputs))), dict(target))
            expect = refused(f"input '{target['name']}' already exists in request")
        elif how == "parameters type":
            document["parameters"] = _json_of(draw, "array", "string", "integer", "float", "true", "false")
            expect = triton("json_parameters")
        elif how == "parameter value":
            key = "x_" + draw(st.text(NO_NUL, max_size=6))
            document["parameters"] = {key: _json_of(draw, "object", "array", "null")}
            expect = refused(f"parameter '{key}' has invalid type. It should be either 'int', 'bool', or 'string'.")
        elif how == "parameter known":
            key = _pick(draw, ["binary_data_output", "priority", "timeout"])
            if key == "binary_data_output":
                document["parameters"] = {key: _json_of(draw, "string", "integer")}
                expect = triton("json_member", f"Unable to parse '{key}': attempt to access JSON non-boolean as boolean")
            else:
                document["parameters"] = {key: draw(st.one_of(JSON_VALUES["string"], st.integers(-2**40, -1), st.booleans()))}
                expect = triton("json_member", f"Unable to parse '{key}': attempt to access JSON non-unsigned-integer as "
                                               "unsigned-integer")
        elif how == "id type":
            document["id"] = _json_of(draw, "object", "array", "integer", "float", "true", "false", "null")
            expect = triton("json_member", "Unable to parse 'id': attempt to access JSON non-string as string")
        elif how == "outputs type":
            document["outputs"] = _json_of(draw, "object", "string", "integer", "float", "true", "false", "null")
            expect = triton("json_member", "Unable to parse 'outputs': attempt to access JSON non-array as array")
        elif how == "output no name":
            document["outputs"] = [{"parameters": {"binary_data": False}}]
            expect = triton("json_member", "Unable to parse 'name': attempt to access non-existing object member 'name'")
        elif how == "data nested":  # TRITON_QUIRKS: flattened, served
            target["data"] = [target["data"]]
            expect = outcome
        else:  # output unknown
            name = draw(st.text(NO_NUL, max_size=8).filter(lambda s: s not in ("images", "seeds")))
            document["outputs"] = [{"name": name}]
            expect = refused(f"unexpected inference output '{name}' for model '{MODEL_NAME}'")
        return _raw_http("json_structure", _dumps(document, draw), [expect], note=how)

    classes["json_structure"] = json_structure

    @st.composite
    def json_int_wrap(draw, variant=None):
        """JSON integers out of their input's range: Triton wraps INT32 values modulo 2**32 (TRITON_QUIRKS)
        and refuses integers beyond int64 (a 500 of its own)."""
        document, values, outcome = draw(request)
        name = variant or _pick(draw, VARIANTS["json_int_wrap"])
        if name == "num_images_per_prompt":  # the seed was drawn for the request's own image count
            values.pop("seed", None)
            document["inputs"] = [i for i in document["inputs"] if i["name"] != "seed"]
        if name == "seed" or draw(st.integers(0, 4)) == 0:
            value = draw(st.one_of(st.integers(2**63, 2**64 - 1), st.integers(-2**70, -2**63 - 1)))
            expect = triton("json_member", "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer")
        else:  # a cheap accepted value or a refused one, plus a multiple of 2**32 (|value| < 2**63)
            sizes = (limits.min_size, limits.min_size + limits.size_multiple)
            wanted = draw(st.one_of(st.sampled_from(sizes if name in ("height", "width") else (1, 2)),
                                    st.integers(-2**31, 2**31 - 1).filter(lambda v: not int_accepted(name, v, limits))))
            value = wanted + draw(st.integers(-2**31 + 1, 2**31 - 1).filter(bool)) * 2**32
            assert wrap_int32(value) == wanted
            if int_accepted(name, wanted, limits):
                served = {**values, name: wanted}
                expect = ok(served.get("num_images_per_prompt", 1), served["height"], served["width"], served.get("seed"))
            else:
                expect = refused(f"{name}: {wanted} is not accepted")
        document["inputs"] = [i for i in document["inputs"] if i["name"] != name] + [_json_input(name, value)]
        return _raw_http("json_int_wrap", _dumps(document, draw), [expect], note=TRITON_QUIRKS["json_int_wrap"])

    classes["json_int_wrap"] = json_int_wrap

    @st.composite
    def binary_request(draw):
        """A valid request in the binary extension: (header, [(name, datatype, payload)], values, outcome)."""
        values, outcome = draw(valid)
        parts = []
        for name, value in values.items():
            datatype = DECLARED[name]
            payload = struct.pack("<I", len(value)) + value if datatype == "BYTES" else struct.pack(PACK[datatype], value)
            parts.append([name, datatype, payload])
        return parts, values, outcome

    def assemble(parts, declared=None) -> tuple[bytes, bytes]:
        declared = declared or [len(p[2]) for p in parts]
        header = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": [1], "parameters": {"binary_data_size": s}}
                                        for (n, d, _), s in zip(parts, declared)]}).encode()
        return header, b"".join(p[2] for p in parts)

    def shortfall(parts, declared, available: int) -> Outcome:
        """The answer when `available` bytes follow the JSON header for inputs declaring these sizes."""
        for (name, _, _), size in zip(parts, declared):
            if available < size:
                return refused(f"unexpected size for input '{name}', expecting {size - available} additional bytes "
                               f"for model '{MODEL_NAME}'")
            available -= size
        if available:
            return refused(f"unexpected additional input data for model '{MODEL_NAME}'")
        return None

    def binary_case(kind, header, blob, length: str, expect, note="") -> Case:
        return _raw_http(kind, header + blob, [expect], headers=(("Inference-Header-Content-Length", length),
                                                                 ("Content-Type", "application/octet-stream")), note=note)

    @st.composite
    def binary_header_length(draw, variant=None):
        parts, _, outcome = draw(binary_request())
        header, blob = assemble(parts)
        how = variant or _pick(draw, VARIANTS["binary_header_length"])
        body = len(header) + len(blob)
        if how == "zero":
            length = "0"
        elif how == "letters":
            length = draw(st.text(st.sampled_from("abcxyz"), max_size=5))
        elif how in ("negative", "beyond body", "huge"):
            length = str(draw({"negative": st.integers(-2**63, -1), "beyond body": st.integers(body + 1, 2**62),
                               "huge": st.integers(2**63, 2**70)}[how]))
        elif how in ("inside header", "digits then letters"):  # the JSON is cut
            length = str(draw(st.integers(1, len(header) - 1)))
            if how == "digits then letters":
                length += draw(st.text(st.sampled_from("abc."), min_size=1, max_size=3))
        elif how == "into binary":  # the JSON parser reads binary bytes after the document
            length = str(draw(st.integers(len(header) + 1, body)))
        else:  # wrapped: the true length plus a multiple of 2**32 (TRITON_QUIRKS)
            length = str(len(header) + draw(st.integers(1, 2**31 - 1)) * 2**32)
        return binary_case("binary_header_length", header, blob, length, header_length_outcome(length, parts, header, blob, outcome),
                           note=how)

    def header_length_outcome(length: str, parts, header: bytes, blob: bytes, outcome: Outcome) -> Outcome:
        """Triton reads Inference-Header-Content-Length as C's atoi: leading digits, as a 32-bit int."""
        digits = re.match(r"[+-]?\d+", length)
        value = wrap_int32(max(-2**63, min(2**63 - 1, int(digits.group()) if digits else 0)))
        body = len(header) + len(blob)
        if value == 0:  # no JSON header: a raw binary tensor, which needs a one-input model
            return refused(f"Raw request must only have 1 input (found 1) to be deduced but got {ENSEMBLE_INPUTS} inputs")
        if value < 0 or value > body:
            return refused(f"inference header size should be in range (0, {body}), got: {length}")
        if value < len(header):
            return triton("json_parse")
        if value == len(header):
            return outcome
        extra = blob[:value - len(header)].lstrip(JSON_WS)
        if extra and extra[0] != 0:  # a NUL ends rapidjson's input
            return triton("json_parse", "The document root must not be followed by other values")
        return shortfall(parts, [len(p[2]) for p in parts], len(blob) - (value - len(header)))

    classes["binary_header_length"] = binary_header_length

    @st.composite
    def binary_payload(draw, variant=None):
        """Honest header length, dishonest payload: truncated, extended, sizes that lie, BYTES elements that lie."""
        parts, values, _ = draw(binary_request())
        sizes = [len(p[2]) for p in parts]
        how = variant or _pick(draw, VARIANTS["binary_payload"])
        declared = list(sizes)
        if how == "truncated":
            header, blob = assemble(parts)
            cut = draw(st.integers(1, len(blob)))
            return binary_case("binary_payload", header, blob[:-cut], str(len(header)), shortfall(parts, sizes, len(blob) - cut), how)
        if how == "extra bytes":
            header, blob = assemble(parts)
            return binary_case("binary_payload", header, blob + draw(st.binary(min_size=1, max_size=32)), str(len(header)),
                               refused(f"unexpected additional input data for model '{MODEL_NAME}'"), how)
        if how in ("size lies", "negative size"):
            j = draw(st.integers(0, len(parts) - 1))
            if how == "negative size":
                header, blob = assemble(parts, declared)
                document = json.loads(header)
                document["inputs"][j]["parameters"]["binary_data_size"] = draw(st.integers(-2**40, -1))
                header = json.dumps(document).encode()
                return binary_case("binary_payload", header, blob, str(len(header)), triton(
                    "json_member", "Unable to parse 'binary_data_size': attempt to access JSON non-unsigned-integer as "
                                   "unsigned-integer"), how)
            declared[j] = draw(st.integers(0, 2**40).filter(lambda s: s != sizes[j]))
            header, blob = assemble(parts, declared)
            return binary_case("binary_payload", header, blob, str(len(header)), shortfall(parts, declared, len(blob)), how)
        j = [p[0] for p in parts].index("prompt")
        text = values["prompt"]
        if how == "string length lies":  # the 4-byte length says more than follows
            claimed = draw(st.integers(len(text) + 1, 2**32 - 1))
            parts[j][2] = struct.pack("<I", claimed) + text
            expect = refused(f"incomplete string data for inference input 'prompt', expecting string of length {claimed} "
                             f"but only {len(text)} bytes available")
        elif how == "two strings":
            parts[j][2] += struct.pack("<I", 1) + b"x"
            expect = refused("unexpected number of string elements 2 for inference input 'prompt'")
        else:  # no string: an empty binary payload for prompt
            parts[j][2] = b""
            expect = refused("expected 1 string elements for inference input 'prompt'")
        header, blob = assemble(parts)
        return binary_case("binary_payload", header, blob, str(len(header)), expect, how)

    classes["binary_payload"] = binary_payload

    @st.composite
    def http_parameter_utf8(draw, variant=None):
        # invalid UTF-8 in a request parameter (raw bytes in the JSON string): Triton passes it on
        document, values, outcome = draw(request)
        bad = draw(st.lists(st.integers(0x80, 0xFF), min_size=1, max_size=8).map(bytes).filter(lambda b: not is_utf8(b)))
        where = variant or _pick(draw, VARIANTS["http_parameter_utf8"])
        key = {"queue_timeout_ms value": QUEUE_TIMEOUT_PARAMETER, "other value": "x_note", "key": "__FUZZ_KEY__"}[where]
        document["parameters"] = {key: "__FUZZ_VALUE__"}
        body = _dumps(document, draw)
        marker = b'"__FUZZ_KEY__"' if where == "key" else b'"__FUZZ_VALUE__"'
        body = body.replace(marker, b'"' + bad + b'"')
        if where == "queue_timeout_ms value":  # refused, naming the parameter or the request's parameters
            expect = [refused(QUEUE_TIMEOUT_PARAMETER), refused("parameters")]
        else:  # a parameter the endpoint does not read: refused, or ignored and served
            expect = [refused(), outcome]
        return _raw_http("http_parameter_utf8", body, expect, note=where)

    classes["http_parameter_utf8"] = http_parameter_utf8
    return classes


# -- raw gRPC: protobuf


def _raw_grpc_strategies(limits: Limits, valid) -> dict:
    from tritonclient.grpc import service_pb2

    def message(values: dict):
        request = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
        raws = []
        for name, value in values.items():
            datatype = DECLARED[name]
            item = request.inputs.add(name=name, datatype=datatype, shape=[1])
            del item  # data goes to raw_input_contents, in order
            raws.append(struct.pack("<I", len(value)) + value if datatype == "BYTES" else struct.pack(PACK[datatype], value))
        return request, raws

    def grpc_case(kind, request, expect, note="") -> Case:
        return Case(kind, "raw-grpc", tuple(expect), body=request.SerializeToString(), note=note)

    @st.composite
    def grpc_raw_contents(draw, variant=None):
        values, outcome = draw(valid)
        request, raws = message(values)
        names = list(values)
        how = variant or _pick(draw, VARIANTS["grpc_raw_contents"])
        if how == "byte size":
            fixed = [k for k, n in enumerate(names) if DECLARED[n] != "BYTES"]
            j = _pick(draw, fixed)
            expected = len(raws[j])
            size = draw(st.integers(0, 24).filter(lambda s: s != expected))
            raws[j] = (raws[j] * 8)[:size]
            expect = refused(f"input byte size mismatch for input '{names[j]}' for model '{MODEL_NAME}'. Expected {expected}, got {size}")
        elif how == "fewer contents":
            keep = draw(st.integers(0, len(raws) - 1))
            raws = raws[:keep]
            expect = refused(f"unable to find data for input tensor '{names[keep]}' for model '{MODEL_NAME}'")
        elif how == "more contents":  # TRITON_QUIRKS: ignored
            raws += draw(st.lists(st.binary(max_size=8), min_size=1, max_size=3))
            expect = outcome
        elif how == "string length lies":
            j = names.index("prompt")
            claimed = draw(st.integers(len(values["prompt"]) + 1, 2**32 - 1))
            raws[j] = struct.pack("<I", claimed) + values["prompt"]
            expect = refused(f"incomplete string data for inference input 'prompt', expecting string of length {claimed} "
                             f"but only {len(values['prompt'])} bytes available")
        else:
            j = draw(st.integers(0, len(names) - 1))
            item = request.inputs[j]
            if DECLARED[names[j]] == "BYTES":
                item.contents.bytes_contents.append(b"x")
            elif DECLARED[names[j]] == "INT64":
                item.contents.int64_contents.append(1)
            elif DECLARED[names[j]] == "FP32":
                item.contents.fp32_contents.append(1.0)
            else:
                item.contents.int_contents.append(1)
            expect = refused(f"contents field must not be specified when using raw_input_contents for '{names[j]}' "
                             f"for model '{MODEL_NAME}'")
        request.raw_input_contents.extend(raws)
        note = TRITON_QUIRKS["grpc_extra_raw_contents"] if how == "more contents" else how
        return grpc_case("grpc_raw_contents", request, [expect], note=note)

    @st.composite
    def grpc_unparsable(draw, variant=None):
        """Invalid UTF-8 in a protobuf `string` field: gRPC refuses to parse the message (TRITON_5XX)."""
        values, _ = draw(valid)
        request, raws = message(values)
        where = variant or _pick(draw, VARIANTS["grpc_unparsable"])
        bad = draw(st.binary(min_size=1, max_size=12).filter(lambda b: not is_utf8(b)))
        marker = "M" * len(bad)  # same length: the field's length prefix stays right
        if where == "input name":
            request.inputs.add(name=marker, datatype="BYTES", shape=[1])
            raws.append(struct.pack("<I", 1) + b"x")
        elif where == "datatype":
            request.inputs.add(name="x_extra", datatype=marker, shape=[1])
            raws.append(b"x")
        elif where == "id":
            request.id = marker
        elif where == "parameter key":
            request.parameters[marker].int64_param = 1
        elif where == "parameter value":
            request.parameters[QUEUE_TIMEOUT_PARAMETER].string_param = marker
        elif where == "output name":
            request.outputs.add(name=marker)
        else:
            request.model_version = marker
        body = request.SerializeToString()  # without the raw contents (the prompt's bytes): the marker is unique
        assert body.count(marker.encode()) == 1, body
        # serialized protobuf messages concatenate into their merge: the raw contents go after
        body = body.replace(marker.encode(), bad) + service_pb2.ModelInferRequest(raw_input_contents=raws).SerializeToString()
        return Case("grpc_unparsable", "raw-grpc", (triton("grpc_parse"),), body=body, note=where)

    return {"grpc_raw_contents": grpc_raw_contents, "grpc_unparsable": grpc_unparsable}


# --------------------------------------------------------------------------------------------------
# Sending


class Fuzzer:
    """Clients of one server: sends Cases and tells whether the server is ready."""

    def __init__(self, http_url: str, grpc_url: str, admin: dict[str, str], timeout_s: float = TIMEOUT_S):
        import grpc
        import tritonclient.grpc as grpc_client
        import tritonclient.http as http_client
        from tritonclient.grpc import service_pb2

        self.http_url, self.grpc_url, self.timeout_s = http_url, grpc_url, timeout_s
        self.http = http_client.InferenceServerClient(http_url, connection_timeout=timeout_s, network_timeout=timeout_s)
        self.grpc = grpc_client.InferenceServerClient(grpc_url)
        self._modules = {"http": http_client, "grpc": grpc_client}
        self._channel = grpc.insecure_channel(grpc_url, options=[("grpc.max_send_message_length", -1),
                                                                 ("grpc.max_receive_message_length", -1)])
        self._raw_grpc = self._channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                                                   response_deserializer=service_pb2.ModelInferResponse.FromString)
        self.limits = served_limits(http_url, admin)
        self.strategies = strategies(self.limits)

    def close(self) -> None:
        self.http.close()
        self.grpc.close()
        self._channel.close()
        self.grpc = self.http = None  # tritonclient's __del__ closes again: now, not at interpreter exit

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def send(self, case: Case) -> Answer:
        start = time.perf_counter()
        send = {"http": self._send_typed, "grpc": self._send_typed, "raw-http": self._send_raw_http, "raw-grpc": self._send_raw_grpc}
        answer = send[case.transport](case)
        answer.seconds = time.perf_counter() - start
        return answer

    def _send_typed(self, case: Case) -> Answer:
        from tritonclient.utils import InferenceServerException

        module = self._modules[case.transport]
        try:
            inputs = []
            for t in case.tensors:
                item = module.InferInput(t.name, list(t.array.shape), t.datatype)
                if case.transport == "http":
                    item.set_data_from_numpy(t.array, binary_data=case.binary)
                else:
                    item.set_data_from_numpy(t.array)
                inputs.append(item)
        except Exception as error:  # noqa: BLE001 - a generator that builds what tritonclient refuses
            return Answer("client error", f"{type(error).__name__}: {error}")
        try:
            if case.transport == "http":
                result = self.http.infer(MODEL_NAME, inputs, parameters=case.parameters)  # network_timeout: the client's
            else:
                result = self.grpc.infer(MODEL_NAME, inputs, parameters=case.parameters, client_timeout=self.timeout_s)
        except InferenceServerException as error:
            status = str(error.status() or "no response").removeprefix("StatusCode.")
            if status == "DEADLINE_EXCEEDED":
                status = "timeout"
            return Answer(status, error.message() or "")
        except (socket.timeout, TimeoutError) as error:
            return Answer("timeout", repr(error))
        except Exception as error:  # noqa: BLE001 - connection closed, gevent timeout...
            return Answer("timeout" if "timeout" in type(error).__name__.lower() else "no response", f"{type(error).__name__}: {error}")
        images, seeds = result.as_numpy("images"), result.as_numpy("seeds")
        return Answer("200" if case.transport == "http" else "OK", images=None if images is None else tuple(images.shape),
                      seeds=None if seeds is None else tuple(int(s) for s in seeds))

    def _send_raw_http(self, case: Case) -> Answer:
        host, port = self.http_url.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=self.timeout_s)
        try:
            connection.request("POST", f"/v2/models/{MODEL_NAME}/infer", body=case.body, headers=dict(case.headers))
            response = connection.getresponse()
            data = response.read()
            header_length = response.getheader("Inference-Header-Content-Length")
        except (socket.timeout, TimeoutError) as error:
            return Answer("timeout", repr(error))
        except (OSError, http.client.HTTPException) as error:
            return Answer("no response", f"{type(error).__name__}: {error}")
        finally:
            connection.close()
        header = data[:int(header_length)] if header_length else data
        try:
            document = json.loads(header)
        except ValueError:
            return Answer(str(response.status), data[:400].decode("utf-8", "replace"))
        if response.status != 200:
            return Answer(str(response.status), str(document.get("error", document)) if isinstance(document, dict) else str(document))
        outputs = {o["name"]: o for o in document.get("outputs", [])}
        seeds = outputs.get("seeds", {}).get("data")
        return Answer("200", images=tuple(outputs["images"]["shape"]) if "images" in outputs else None,
                      seeds=None if seeds is None else tuple(seeds))

    def _send_raw_grpc(self, case: Case) -> Answer:
        import grpc

        try:
            response = self._raw_grpc(case.body, timeout=self.timeout_s)
        except grpc.RpcError as error:
            status = error.code().name
            return Answer("timeout" if status == "DEADLINE_EXCEEDED" else status, error.details() or "")
        shapes = {o.name: tuple(o.shape) for o in response.outputs}
        contents = {o.name: raw for o, raw in zip(response.outputs, response.raw_output_contents)}
        seeds = tuple(int(s) for s in np.frombuffer(contents["seeds"], dtype=np.int64)) if "seeds" in contents else None
        return Answer("OK", images=shapes.get("images"), seeds=seeds)

    def reference_image(self, protocol: str = "http") -> np.ndarray:
        """The fixed request's image (REFERENCE), through tritonclient."""
        module = self._modules[protocol]
        inputs = []
        for name, value in REFERENCE.items():
            t = endpoint_tensor(name, value)
            item = module.InferInput(name, [1], t.datatype)
            item.set_data_from_numpy(t.array)
            inputs.append(item)
        if protocol == "http":
            return self.http.infer(MODEL_NAME, inputs).as_numpy("images")
        return self.grpc.infer(MODEL_NAME, inputs, client_timeout=self.timeout_s).as_numpy("images")


# --------------------------------------------------------------------------------------------------
# The benchmark

# Share of the examples per class (valid requests cost about 0.1 s each, refusals about 1 ms).
WEIGHTS = {"valid_small": 2, "wrong_datatype": 8, "wrong_shape": 8, "int_out_of_range": 10, "guidance_out_of_range": 6,
           "missing_prompt": 3, "unknown_input": 6, "input_name_nul": 3, "invalid_utf8_text": 8, "oversize_text": 5,
           "request_parameter": 5, "queue_timeout_idle": 1, "json_malformed": 8, "json_invalid_utf8": 4, "json_structure": 14,
           "json_int_wrap": 5, "binary_header_length": 8, "binary_payload": 8, "http_parameter_utf8": 2,
           "grpc_raw_contents": 6, "grpc_unparsable": 4}


def normalized(message: str) -> str:
    """An answer's message with its variable parts replaced, to count kinds of answers."""
    message = re.sub(r"'[^']*'", "'…'", message[:300])
    message = re.sub(r"b'…'|b\"[^\"]*\"", "b'…'", message)
    return re.sub(r"(?<![\w.-])-?\d+(\.\d+)?(e[+-]?\d+)?", "N", message)[:160]


KEEP_FAILURES = 3


class Recorder:
    def __init__(self, fuzzer: Fuzzer):
        self.fuzzer = fuzzer
        self.counts = collections.defaultdict(collections.Counter)  # class -> "transport label" -> n
        self.answers = collections.defaultdict(collections.Counter)  # class -> "status message" -> n
        self.failures: list[dict] = []  # the first KEEP_FAILURES of each class and variant, with reproducers
        self.failure_counts = collections.Counter()  # "class variant" -> failures
        self.seconds = collections.Counter()
        self.variants = collections.defaultdict(collections.Counter)  # class -> variant -> n

    def __call__(self, case: Case, variant: str | None = None) -> None:
        answer = self.fuzzer.send(case)
        self.variants[case.kind][str(variant)] += 1
        label, problem = judge(case, answer)
        ready = self.fuzzer.is_ready()
        if not ready:
            problem = (problem + "; " if problem else "") + "server not ready afterwards"
        self.counts[case.kind][f"{case.transport} {label}"] += 1
        self.answers[case.kind][f"{answer.status} {normalized(answer.message) if answer.message else ''}".strip()] += 1
        self.seconds[case.kind] += answer.seconds
        if problem:
            key = f"{case.kind} {variant}" if variant else case.kind
            self.failure_counts[key] += 1
        if problem and self.failure_counts[key] <= KEEP_FAILURES:
            self.failures.append({"class": case.kind, "variant": variant, "problem": problem, "known": case.kind in SERVING_BUGS,
                                  "answer": {"status": answer.status, "message": answer.message[:1000]},
                                  "reproducer": reproducer(case)})
            if len(self.failures) <= 10 or not ready:
                log(f"FAIL {case.kind}: {problem}\n       {describe(case)}")
        if not ready:
            raise ServerDown(f"server not ready after {describe(case)}")


class ServerDown(RuntimeError):
    pass


def run_class(recorder: Recorder, name: str, examples: int) -> None:
    """`examples` cases of the class, shared evenly among its variants (no shrinking: every case counts)."""
    variants = VARIANTS.get(name, (None,))
    for k, variant in enumerate(variants):
        share = examples // len(variants) + (k < examples % len(variants))
        if not share:
            continue

        @settings(max_examples=share, deadline=None, database=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
                  suppress_health_check=list(HealthCheck))
        @given(recorder.fuzzer.strategies[name](variant))
        def fuzz(case):
            recorder(case, variant)

        fuzz()


def log(message: str) -> None:
    print(f"[fuzz] {message}", file=sys.stderr, flush=True)


def start_server(work: Path):
    """The tiny SDXL exported into `work`, served (CPU variant) on free ports, as tests/conftest.py does."""
    from contract.configs import CPU_DTYPE
    from export.onnx_export import export_pipeline
    from export.sources import LoraSpec, Sources, load_pipeline
    from export.tiny import write_tiny
    tiny = work / "tiny"
    write_tiny(tiny, seed=0)
    repository = work / f"repo_{CPU_DTYPE}"
    export_pipeline(load_pipeline(Sources(str(tiny), (LoraSpec(str(tiny / "lora")),), str(tiny / "alt_vae")), CPU_DTYPE),
                    repository, CPU_DTYPE)
    server = bench_server(repository, work / "tritonserver.log", extra_args=["--model-control-mode=explicit", "--load-model=*"])
    return server.start()


def _stub_regions(server_pid: int) -> list[str]:
    """The shared-memory regions of the server's Python-backend stubs (their argv[2]): a server that
    crashes leaves them in /dev/shm."""
    regions = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == server_pid and len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
            regions.append(argv[2].decode())
    return regions


def run_crash_check(fuzzer: Fuzzer, server) -> dict:
    """Send KNOWN_TRITON_CRASH to this (last-used) server: does Triton still die of it?"""
    regions = _stub_regions(server.process.pid)
    host, port = fuzzer.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", f"/v2/models/{MODEL_NAME}/infer", body=KNOWN_TRITON_CRASH, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = f"{response.status} {response.read()[:300].decode('utf-8', 'replace')}"
    except (OSError, http.client.HTTPException) as error:
        answer = f"no response: {type(error).__name__}: {error}"
    finally:
        connection.close()
    time.sleep(2)
    alive = server.process.poll() is None and fuzzer.is_ready()
    log_lines = Path(server.log_file).read_text(errors="replace").splitlines() if server.log_file else []
    result = {"request": f"POST /v2/models/{MODEL_NAME}/infer {KNOWN_TRITON_CRASH.decode()}", "answer": answer,
              "server_alive_afterwards": alive, "exit_code": server.process.poll(),
              "server_log": [line.strip() for line in log_lines if line.startswith(("terminate called", "  what()", "Signal ("))]}
    if not alive:
        server.stop()
        for region in regions:  # what the dead server's stubs left behind
            Path("/dev/shm", region).unlink(missing_ok=True)
        try:
            from serving.admission import run_directory

            shutil.rmtree(run_directory(server.process.pid), ignore_errors=True)
        except ImportError:
            pass
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("fuzz", __doc__, "fuzz")
    parser.add_argument("--examples", type=int, default=3000, help="examples in all, shared among the classes by WEIGHTS")
    parser.add_argument("--classes", nargs="*", default=list(WEIGHTS), choices=list(WEIGHTS))
    parser.add_argument("--skip-crash-check", action="store_true", help="do not send KNOWN_TRITON_CRASH at the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    total_weight = sum(WEIGHTS[c] for c in args.classes)
    shares = {c: max(1, round(args.examples * WEIGHTS[c] / total_weight)) for c in args.classes}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sdxl-fuzz-") as work:
        log("exporting the tiny SDXL and starting tritonserver ...")
        server = start_server(Path(work))
        fuzzer = None
        try:
            fuzzer = Fuzzer(server.http_url, server.grpc_url, server.admin_headers())
            before = fuzzer.reference_image("http")
            recorder = Recorder(fuzzer)
            stopped = None
            for name in args.classes:
                log(f"{name}: {shares[name]} examples ...")
                t0 = time.perf_counter()
                try:
                    run_class(recorder, name, shares[name])
                except ServerDown as error:
                    stopped = str(error)
                    break
                log(f"{name}: {sum(recorder.counts[name].values())} cases in {time.perf_counter() - t0:.1f} s")
            after = {}
            if stopped is None:
                after = {p: bool(np.array_equal(fuzzer.reference_image(p), before)) for p in ("http", "grpc")}
            ready = fuzzer.is_ready()
            crash = None
            if not args.skip_crash_check and stopped is None:
                log("sending the known Triton crash (KNOWN_TRITON_CRASH) ...")
                crash = run_crash_check(fuzzer, server)
        finally:
            if fuzzer is not None:
                fuzzer.close()
            server.stop()
    results = {
        "command": results_env(args.out == parser.get_default("out"))
                   + shlex.join(["python", "-m", "benchmarks.fuzz", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
                   f"{platform.machine()}, no GPU",
        "seconds": round(time.time() - started, 1),
        "limits": {k: getattr(fuzzer.limits, k)
                   for k in ("min_size", "max_size", "max_images", "min_steps", "max_steps", "max_prompt_bytes")},
        "examples_asked": shares,
        "cases": {c: sum(recorder.counts[c].values()) for c in args.classes},
        "counts": {c: dict(sorted(recorder.counts[c].items())) for c in args.classes},
        "cases_per_variant": {c: dict(recorder.variants[c]) for c in args.classes if c in VARIANTS},
        "answers": {c: dict(recorder.answers[c].most_common()) for c in args.classes},
        "seconds_per_class": {c: round(recorder.seconds[c], 2) for c in args.classes},
        "stopped_early": stopped,
        "server_ready_after": ready,
        "reference_image_unchanged": after,
        "failure_counts": dict(recorder.failure_counts),
        "known_failure_classes": sorted({f["class"] for f in recorder.failures if f["known"]}),
        "failures": recorder.failures,
        "triton_5xx_allow_list": {k: {"status": s, "message": p} for k, (s, p) in TRITON_5XX.items()},
        "triton_quirks": TRITON_QUIRKS,
        "serving_bugs": SERVING_BUGS,
        "fixed_serving_bugs": FIXED_SERVING_BUGS,
        "known_triton_crash": crash,
    }
    save_results(results, args.out, write_markdown, default=str, show=False)
    unknown = [f for f in recorder.failures if not f["known"]]
    log(f"{sum(results['cases'].values())} cases, {sum(recorder.failure_counts.values())} failures "
        f"({len(unknown)} kept outside SERVING_BUGS); "
        f"wrote {args.out.with_suffix('.md')} and .json")
    return 1 if unknown or stopped or not ready or not all(after.values()) else 0


def write_markdown(results: dict, path: Path) -> None:
    total = sum(results["cases"].values())
    failures = results["failures"]
    lines = [
        "# ensemble_sdxl fuzzing (hypothesis, real tritonserver, CPU variant, tiny SDXL)", "",
        f"`{results['command']}`, {results['date']}, {results['machine']}: {total} cases in {results['seconds']} s "
        "(export and server start included).", "",
        f"Served limits: {results['limits']}.", "",
        f"After the fuzzing: server ready **{results['server_ready_after']}**, the fixed request "
        f"({REFERENCE['prompt'].decode()!r}, seed {REFERENCE['seed']}, {REFERENCE['height']}x{REFERENCE['width']}, "
        f"{REFERENCE['num_inference_steps']} steps) gives the same image bytes as before: "
        + (", ".join(f"{p} **{v}**" for p, v in results["reference_image_unchanged"].items()) or "not checked") + ".",
        "" if not results["stopped_early"] else f"\n**Stopped early**: {results['stopped_early']}\n",
        "## Cases per class and outcome", "",
        "ok: served; refused: 4xx / INVALID_ARGUMENT with the expected message; triton-5xx: an allow-listed Triton "
        "answer (below) with its exact message; unexpected: anything else (a failure).", "",
        "| class | cases | outcomes (transport outcome: count) | failures | s |", "|---|---:|---|---:|---:|",
    ]
    for name, count in results["cases"].items():
        outcomes = ", ".join(f"{k}: {v}" for k, v in results["counts"][name].items())
        failed = sum(n for key, n in results["failure_counts"].items() if key.split(" ")[0] == name)
        lines.append(f"| {name}{' (known serving bug)' if name in results['serving_bugs'] else ''} | {count} | {outcomes} | "
                     f"{failed} | {results['seconds_per_class'][name]} |")
    lines += ["", "## Answers seen (status and message, numbers and quoted parts replaced)", ""]
    for name, answers in results["answers"].items():
        lines.append(f"- **{name}**: " + "; ".join(f"`{a}` ×{n}" for a, n in list(answers.items())[:8])
                     + (f"; … {len(answers) - 8} more kinds" if len(answers) > 8 else ""))
    lines += ["", "## Allow-listed Triton 5xx (requests that never reach a model of this repository)", "",
              "| key | status | exact message (pattern) |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | `{v['message']}` |" for k, v in results["triton_5xx_allow_list"].items()]
    lines += ["", "## Triton quirks the cases expect (bad requests Triton serves)", ""]
    lines += [f"- **{k}**: {v}" for k, v in results["triton_quirks"].items()]
    lines += ["", "## Serving bugs the fuzzing found, fixed since (their classes check the fix)", ""]
    lines += [f"- **{k}**: {v} ({results['cases'].get(k, 0)} cases this run, "
              f"{sum(n for key, n in results['failure_counts'].items() if key.split(' ')[0] == k)} failures)"
              for k, v in results["fixed_serving_bugs"].items()]
    lines += ["", "## Failures", ""]
    if not failures:
        lines.append("None.")
    by_class = collections.defaultdict(list)
    for failure in failures:
        by_class[failure["class"]].append(failure)
    for name, items in by_class.items():
        known = f" — known serving bug: {results['serving_bugs'][name]}" if name in results["serving_bugs"] else ""
        failed = sum(n for key, n in results["failure_counts"].items() if key.split(" ")[0] == name)
        lines.append(f"- **{name}**: {failed} case(s){known}. First: {items[0]['problem'][:400]}  ")
        lines.append(f"  reproducer: `{items[0]['reproducer']['described'][:600]}`")
    crash = results["known_triton_crash"]
    lines += ["", "## Known Triton crash (sent last, to this run's own server)", ""]
    if crash is None:
        lines.append("Not checked (--skip-crash-check, or the run stopped early).")
    else:
        lines.append(f"`{crash['request'][:300]}` → {crash['answer'][:200]}; server alive afterwards: "
                     f"**{crash['server_alive_afterwards']}** (exit code {crash['exit_code']}; its log: "
                     f"{' / '.join(crash['server_log']) or 'nothing'}). Shapes whose byte size overflows 64 bits "
                     "([2**62]) end in a SIGSEGV instead. The same shapes over gRPC or in the binary extension get a "
                     "400; the fuzzing's shapes hold at most 27 elements.")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
