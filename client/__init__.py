"""A small client for `ensemble_sdxl` over HTTP or gRPC, and for `sdxl_stream` over gRPC (tritonclient).

    from client import generate
    result = generate("a photo of a cat", url="localhost:8000", seed=42)
    result.images   # uint8 [N, H, W, 3]
    result.seeds    # [42, ...]

    for update in generate("a photo of a cat", protocol="grpc", stream=True, preview_every=1):
        update.step, update.num_inference_steps, update.images  # a preview, or None; the last: final

    generate("a watercolor", image="photo.png", strength=0.6)             # img2img
    generate("a red sofa", image="room.png", mask="sofa_mask.png")        # inpainting (255: repaint)
    generate("a cat", output_format="jpeg").encoded_images                # [bytes]: one JPEG file per image
    generate("a cat").nsfw_detected    # [bool] per image where the server runs the safety checker, else None
    generate("a house", controls=[Control("canny", "edges.png", scale=0.8)])  # ControlNets (docs/controlnet.md)
    for frame in generate_session(({"image": f} for f in frames), prompt="a watercolor", strength=0.5):
        frame.index, frame.skipped, frame.images                          # a real-time session: latest wins

Only the inputs you set are sent; the server applies the endpoint's defaults to the others (the
step count and guidance default to the served recipe's: `info()` tells which recipe that is).
"""

from __future__ import annotations

import queue
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

MODEL = "ensemble_sdxl"
STREAM_MODEL = "sdxl_stream"
LIBRARY_MODEL = "loras"  # the LoRA library (model_repository/loras)
DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}
# name -> (Triton dtype, numpy dtype) of the optional inputs
_OPTIONAL = {
    "negative_prompt": ("BYTES", np.object_),
    "seed": ("INT64", np.int64),
    "num_inference_steps": ("INT32", np.int32),
    "guidance_scale": ("FP32", np.float32),
    "height": ("INT32", np.int32),
    "width": ("INT32", np.int32),
    "num_images_per_prompt": ("INT32", np.int32),
    "preview_every": ("INT32", np.int32),  # sdxl_stream only
    "output_format": ("BYTES", np.object_),
    "output_quality": ("INT32", np.int32),
    "apply_watermark": ("BOOL", np.bool_),
    "high_noise_frac": ("FP32", np.float32),
}
# What a file name's extension asks the server for (output_format).
FORMATS_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


class ClientError(RuntimeError):
    """The server refused or failed the request (its message), or could not be reached."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status  # the server's status: "400" over HTTP, "StatusCode.INVALID_ARGUMENT" over gRPC


@dataclass
class StreamUpdate:
    """One response of `sdxl_stream`: progress after a denoising step, with a preview on every
    `preview_every`-th step; the last one (`final`) carries the final images."""

    step: int
    num_inference_steps: int
    images: np.ndarray | None  # uint8 [N, H, W, 3]: a preview (step < num_inference_steps) or the final images
    seeds: list[int]
    seconds: float  # since the request was sent
    encoded_images: list[bytes] | None = None  # the final files, with an output_format
    nsfw_detected: list[bool] | None = None  # with the final images: the safety checker's flags, where the server runs it

    @property
    def final(self) -> bool:
        return self.step == self.num_inference_steps


@dataclass
class GenerationResult:
    images: np.ndarray | None  # uint8 [N, H, W, 3], RGB; None with an output_format (not sent)
    seeds: list[int]
    seconds: float  # request round trip, as the client saw it
    encoded_images: list[bytes] | None = None  # one PNG, JPEG or WebP file per image, with an output_format
    # The safety checker's flag per image; None where the server runs no checker (its deployment's
    # choice: docs/outputs.md). Under the "black" policy a flagged image is black.
    nsfw_detected: list[bool] | None = None


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol {protocol!r}: expected http or grpc")
    return module


@contextmanager
def _connected(url: str, protocol: str, timeout_s: float):
    """(tritonclient client, per-call keyword arguments); any failure becomes one ClientError."""
    from tritonclient.utils import InferenceServerException

    module = _module(protocol)
    if protocol == "http":
        client = module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        call = dict()
    else:
        client = module.InferenceServerClient(url)
        call = dict(client_timeout=timeout_s)
    try:
        yield client, call
    except ClientError:
        raise
    except InferenceServerException as error:
        raise ClientError(f"{url} ({protocol}): {error.message() or error}", error.status()) from None
    except Exception as error:  # connection refused, DNS... from either transport
        raise ClientError(f"{url} ({protocol}): cannot reach the server: {error}") from None
    finally:
        client.close()


def _text(value) -> np.ndarray:
    return np.array([value.encode("utf-8") if isinstance(value, str) else value], dtype=np.object_)


def build_inputs(protocol: str, prompt: str | bytes | None, **options) -> list:
    """InferInputs for the prompt (None: not sent) and every option that is not None."""
    module = _module(protocol)
    inputs = []

    def add(name, triton_dtype, array):
        tensor = module.InferInput(name, list(array.shape), triton_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)

    if prompt is not None:
        add("prompt", "BYTES", _text(prompt))
    for name, value in options.items():
        if name not in _OPTIONAL:
            raise TypeError(f"unknown option {name!r}; known: {', '.join(_OPTIONAL)}")
        if value is None:
            continue
        triton_dtype, numpy_dtype = _OPTIONAL[name]
        add(name, triton_dtype, _text(value) if triton_dtype == "BYTES" else np.array([value], dtype=numpy_dtype))
    return inputs


def lora_inputs(protocol: str, loras: Sequence[tuple[str, float]]) -> list:
    """lora_names (BYTES [K]) and lora_scales (FP32 [K]) of [(name, scale)]."""
    module = _module(protocol)
    names = np.array([name.encode("utf-8") for name, _ in loras], dtype=np.object_)
    scales = np.array([scale for _, scale in loras], dtype=np.float32)
    tensors = [module.InferInput("lora_names", [len(loras)], "BYTES"), module.InferInput("lora_scales", [len(loras)], "FP32")]
    tensors[0].set_data_from_numpy(names)
    tensors[1].set_data_from_numpy(scales)
    return tensors


def load_image(value, mode: str) -> np.ndarray:
    """An image input as the endpoint takes it: a path or PIL image converted to `mode` ("RGB":
    uint8 [H, W, 3]; "L": uint8 [H, W]), or an array sent as it is (the server checks it)."""
    if isinstance(value, np.ndarray):
        return value
    from PIL import Image

    if isinstance(value, (str, Path)):
        try:
            with Image.open(value) as opened:
                return np.asarray(opened.convert(mode))
        except (OSError, ValueError) as error:
            raise ClientError(f"{value}: cannot read the image: {error}") from None
    return np.asarray(value.convert(mode))


@dataclass(frozen=True)
class Control:
    """One ControlNet of a request: a name the server serves (`controlnets()`; a ControlNet-Union's mode as
    NAME/MODE, union/depth), its control image (a
    path, a PIL image or uint8 [H, W, 3], at the output size), its scale (0 to 2), the window of the
    schedule it runs in ([start, end) as fractions), and whether the server's preprocessor makes the
    control map from the image (ControlNets that declare one)."""

    name: str
    image: object
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: bool = False


def control_inputs(protocol: str, controls: Sequence[Control]) -> list:
    """control_names, control_images, control_scales, control_guidance_start, control_guidance_end and
    control_preprocess of `controls` ([K] each; the images stacked, [K, H, W, 3])."""
    module = _module(protocol)
    images = [load_image(control.image, "RGB") for control in controls]
    if len({image.shape for image in images}) > 1:
        raise ClientError(f"controls: the control images differ in size ({', '.join(str(i.shape) for i in images)}); "
                          "each must be the output's size")
    arrays = {
        "control_names": ("BYTES", np.array([c.name.encode("utf-8") for c in controls], dtype=np.object_)),
        "control_images": ("UINT8", np.ascontiguousarray(np.stack(images)).astype(np.uint8, copy=False)),
        "control_scales": ("FP32", np.array([c.scale for c in controls], dtype=np.float32)),
        "control_guidance_start": ("FP32", np.array([c.start for c in controls], dtype=np.float32)),
        "control_guidance_end": ("FP32", np.array([c.end for c in controls], dtype=np.float32)),
        "control_preprocess": ("BOOL", np.array([c.preprocess for c in controls], dtype=np.bool_)),
    }
    tensors = []
    for name, (triton_dtype, array) in arrays.items():
        tensors.append(module.InferInput(name, list(array.shape), triton_dtype))
        tensors[-1].set_data_from_numpy(array)
    return tensors


def image_inputs(protocol: str, image=None, strength: float | None = None, mask=None) -> list:
    """image (UINT8 [H, W, 3]), strength (FP32 [1]) and mask (UINT8 [H, W]), those that are given.
    An array goes as its own dtype: the server answers one of another type, naming the input."""
    from tritonclient.utils import np_to_triton_dtype

    module = _module(protocol)
    arrays = {"image": None if image is None else load_image(image, "RGB"),
              "strength": None if strength is None else np.array([strength], dtype=np.float32),
              "mask": None if mask is None else load_image(mask, "L")}
    tensors = []
    for name, array in arrays.items():
        if array is not None:
            array = np.ascontiguousarray(array)
            tensors.append(module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
            tensors[-1].set_data_from_numpy(array)
    return tensors


def ip_adapter_inputs(protocol: str, image, scale: float | None = None, layers: str | None = None) -> list:
    """ip_adapter_image (UINT8 [H, W, 3], any size), ip_adapter_scale (FP32 [1]) and ip_adapter_layers
    (BYTES [1]), those that are given."""
    from tritonclient.utils import np_to_triton_dtype

    module = _module(protocol)
    arrays = {"ip_adapter_image": np.ascontiguousarray(load_image(image, "RGB")),
              "ip_adapter_scale": None if scale is None else np.array([scale], dtype=np.float32),
              "ip_adapter_layers": None if layers is None else np.array([layers.encode("utf-8")], dtype=np.object_)}
    tensors = []
    for name, array in arrays.items():
        if array is not None:
            tensors.append(module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
            tensors[-1].set_data_from_numpy(array)
    return tensors


def request_inputs(protocol: str, prompt, *, loras=None, image=None, strength=None, mask=None, controls=None,
                   ip_adapter_image=None, ip_adapter_scale=None, ip_adapter_layers=None, **options) -> list:
    """The InferInputs of one request: the prompt, the scalar options (build_inputs) and the LoRA, image,
    ControlNet and image-prompt inputs that are given."""
    inputs = build_inputs(protocol, prompt, **options)
    if loras:
        inputs += lora_inputs(protocol, loras)
    inputs += image_inputs(protocol, image, strength, mask)
    if controls:
        inputs += control_inputs(protocol, controls)
    if ip_adapter_image is not None:
        inputs += ip_adapter_inputs(protocol, ip_adapter_image, ip_adapter_scale, ip_adapter_layers)
    elif ip_adapter_scale is not None or ip_adapter_layers is not None:
        raise ClientError("ip_adapter_scale and ip_adapter_layers go with an ip_adapter_image")
    return inputs


def generate(
    prompt: str | bytes | None, *, url: str | None = None, protocol: str = "http", seed: int | None = None,
    num_inference_steps: int | None = None, guidance_scale: float | None = None, negative_prompt: str | None = None,
    height: int | None = None, width: int | None = None, num_images_per_prompt: int | None = None,
    timeout_s: float = 600.0, queue_timeout_ms: int | None = None, stream: bool = False, preview_every: int | None = None,
    loras: Sequence[tuple[str, float]] | None = None, image=None, strength: float | None = None, mask=None,
    output_format: str | None = None, output_quality: int | None = None, apply_watermark: bool | None = None,
    high_noise_frac: float | None = None, controls: Sequence[Control] | None = None, ip_adapter_image=None,
    ip_adapter_scale: float | None = None, ip_adapter_layers: str | None = None,
) -> GenerationResult | Iterator[StreamUpdate]:
    """One request to `ensemble_sdxl`; raises ClientError with the server's message on failure.
    queue_timeout_ms: the longest wait for a denoising slot the server may make this request wait
    (a request parameter; refused with UNAVAILABLE past it). loras: [(name, scale)] from the
    server's LoRA library (`python -m export lora add`), sent as lora_names and lora_scales.
    image: img2img's init image (a path, a PIL image or uint8 [H, W, 3]; its size is the output's),
    strength: the part of the schedule that runs (default: the server's, 0.8), mask: inpainting
    (a path, a PIL image or uint8 [H, W]; 255 repaint, 0 keep). output_format: png, jpeg or webp:
    the images come as files (`encoded_images`; the raw pixels are not sent), output_quality: 1 to
    100 for JPEG and WebP (server default 90), apply_watermark: SDXL's invisible watermark (default:
    the server's setting). high_noise_frac: where a served refiner takes over, in (0, 1] (default: the
    recipe's, 0.8 for sdxl-base-refiner; 1.0: the base alone). controls: ControlNets (Control), each
    with its control image at the output size, scale and window. ip_adapter_image: an image prompt (a
    path, a PIL image or uint8 [H, W, 3], any size) for a server that serves an IP-Adapter, its scale
    (0 to 2, default 1.0) and its layers (all, style, layout or style_and_layout; default all).

    stream=True (gRPC only): the request goes to `sdxl_stream`, and an iterator of StreamUpdate is
    returned, one per denoising step (a preview image on every `preview_every`-th step; default 0:
    none), the last with the final images. Closing the iterator early (break) cancels the request:
    the server stops its work at the next step."""
    url = url or DEFAULT_URLS[protocol]
    inputs = request_inputs(
        protocol, prompt, negative_prompt=negative_prompt, seed=seed, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
        output_format=output_format, output_quality=output_quality, apply_watermark=apply_watermark,
        high_noise_frac=high_noise_frac, loras=loras, image=image, strength=strength, mask=mask, controls=controls,
        ip_adapter_image=ip_adapter_image, ip_adapter_scale=ip_adapter_scale, ip_adapter_layers=ip_adapter_layers,
    )
    encoded = output_format is not None and output_format != "raw"
    parameters = None if queue_timeout_ms is None else {"queue_timeout_ms": queue_timeout_ms}
    if stream:
        if protocol != "grpc":
            raise ClientError(f"stream=True: {STREAM_MODEL} answers over gRPC streams only; use protocol='grpc' (got {protocol!r})")
        if preview_every is not None:
            inputs += build_inputs(protocol, None, **{"preview_every": preview_every})
        return _stream(url, inputs, parameters, timeout_s)
    if preview_every is not None:
        raise ClientError("preview_every is an input of the streaming endpoint: pass stream=True with it")
    module = _module(protocol)
    outputs = [module.InferRequestedOutput(name) for name in ("encoded_images" if encoded else "images", "seeds", "nsfw_detected")]
    start = time.perf_counter()
    with _connected(url, protocol, timeout_s) as (client, call):
        result = client.infer(MODEL, inputs, outputs=outputs, parameters=parameters, **call)
    seconds = time.perf_counter() - start
    return GenerationResult(result.as_numpy("images"), [int(s) for s in result.as_numpy("seeds")], seconds,
                            _files(result.as_numpy("encoded_images")), _flags(result.as_numpy("nsfw_detected")))


def _files(array: np.ndarray | None) -> list[bytes] | None:
    return None if array is None else [bytes(item) for item in array.reshape(-1)]


def _flags(array: np.ndarray | None) -> list[bool] | None:
    """nsfw_detected as a list; None when absent or empty (the server runs no safety checker)."""
    return None if array is None or array.size == 0 else [bool(flag) for flag in array.reshape(-1)]


def _stream(url: str, inputs: list, parameters: dict | None, timeout_s: float) -> Iterator[StreamUpdate]:
    """StreamUpdates of one `sdxl_stream` request, as they arrive; leaving early cancels it."""
    from tritonclient.utils import InferenceServerException

    arrivals: queue.Queue = queue.Queue()
    with _connected(url, "grpc", timeout_s) as (client, _):
        client.start_stream(callback=lambda result, error: arrivals.put((result, error)), stream_timeout=timeout_s)
        start = time.perf_counter()
        finished = False
        try:
            client.async_stream_infer(STREAM_MODEL, inputs, parameters=parameters)
            while not finished:
                try:
                    result, error = arrivals.get(timeout=timeout_s)
                except queue.Empty:
                    raise ClientError(f"{url} (grpc): no response from {STREAM_MODEL} in {timeout_s:g} s") from None
                if error is not None:
                    finished = True  # an error ends the request on the server: nothing to cancel
                    raise ClientError(f"{url} (grpc): {error.message() if isinstance(error, InferenceServerException) else error}",
                                      error.status() if isinstance(error, InferenceServerException) else None)
                update = StreamUpdate(int(result.as_numpy("step")[0]), int(result.as_numpy("num_inference_steps")[0]),
                                      result.as_numpy("images"), [int(s) for s in result.as_numpy("seeds")],
                                      time.perf_counter() - start, _files(result.as_numpy("encoded_images")),
                                      _flags(result.as_numpy("nsfw_detected")))
                finished = update.final
                yield update
        finally:
            # Left before the final images (break, close, no response in time): cancel the request on
            # the server. Not after its end: a cancel that races the final response kept the model
            # from unloading (tritonserver 2.51's shutdown then waited out its exit timeout).
            client.stop_stream(cancel_requests=not finished)


@dataclass(frozen=True)
class SessionFrame:
    """A session's answer to one frame: `index` (the order it was sent in), its final images, or `skipped`
    (a newer frame of the session arrived before it started: no image), and the seconds from its sending."""

    index: int
    images: np.ndarray | None
    seeds: list[int]
    skipped: bool
    seconds: float


def generate_session(frames: Iterable[dict], *, url: str | None = None, session_id: str | None = None,
                     timeout_s: float = 600.0, **common) -> Iterator[SessionFrame]:
    """A real-time session on one `sdxl_stream` gRPC stream (docs/batching-and-streaming.md, "Sessions"):
    each element of `frames` is one request's options (generate()'s: prompt, image, strength, seed...),
    over `common`, sent as the iterator yields it (pace it there: an iterator that waits sends at its
    rate). The server runs at most one frame of the session at a time and answers a frame that has not
    started when a newer one arrives as skipped; a frame's request id is its index (0, 1, 2...), which
    the server orders the frames by. Yields each frame's answer as it arrives; a frame's error raises
    ClientError. Leaving early cancels what is in flight."""
    import threading
    import uuid

    url = url or DEFAULT_URLS["grpc"]
    session = np.array([(session_id or uuid.uuid4().hex).encode("utf-8")], dtype=np.object_)
    arrivals: queue.Queue = queue.Queue()
    sent, answered, done_sending = {}, 0, threading.Event()
    with _connected(url, "grpc", timeout_s) as (client, _):
        module = _module("grpc")
        client.start_stream(callback=lambda result, error: arrivals.put((result, error)), stream_timeout=timeout_s)

        def send_all() -> None:
            try:
                for index, frame in enumerate(frames):
                    options = {**common, **frame}
                    inputs = request_inputs("grpc", options.pop("prompt", None), **options)
                    tensor = module.InferInput("session_id", [1], "BYTES")
                    tensor.set_data_from_numpy(session)
                    sent[str(index)] = time.perf_counter()
                    client.async_stream_infer(STREAM_MODEL, [*inputs, tensor], request_id=str(index))
            except Exception as error:  # noqa: BLE001 - reported to the reading side
                arrivals.put((None, error))
            finally:
                done_sending.set()
                arrivals.put((None, None))

        sender = threading.Thread(target=send_all, name="session-sender", daemon=True)
        sender.start()
        try:
            while not (done_sending.is_set() and answered == len(sent)):
                try:
                    result, error = arrivals.get(timeout=timeout_s)
                except queue.Empty:
                    raise ClientError(f"{url} (grpc): no response from {STREAM_MODEL} in {timeout_s:g} s") from None
                if error is not None:
                    message = error.message() if hasattr(error, "message") else str(error)
                    raise ClientError(f"{url} (grpc): {message}", error.status() if hasattr(error, "status") else None)
                if result is None:
                    continue
                skipped = result.as_numpy("skipped")
                step, steps = result.as_numpy("step"), result.as_numpy("num_inference_steps")
                if skipped is None and int(step[0]) != int(steps[0]):
                    continue  # progress of a running frame
                request_id = result.get_response().id
                answered += 1
                yield SessionFrame(int(request_id), None if skipped is not None and skipped[0] else result.as_numpy("images"),
                                   [int(s) for s in result.as_numpy("seeds")], bool(skipped is not None and skipped[0]),
                                   time.perf_counter() - sent[request_id])
        finally:
            client.stop_stream(cancel_requests=not (done_sending.is_set() and answered == len(sent)))


def _admin_call(url: str | None, protocol: str, timeout_s: float, admin_key: str | None, admin_key_file, api: str, request):
    """request(client, headers, call) against one of Triton's admin APIs (`api`, for the message), with
    the key: `admin_key`, else $SDXL_ADMIN_KEY, else `admin_key_file`, else the one `make serve`
    generated (build/admin-key). A refusal names what key was sent, or where one is found."""
    from contract import security

    url = url or DEFAULT_URLS[protocol]
    try:
        key = admin_key or security.client_key(Path(admin_key_file) if admin_key_file else None)
    except security.AdminKeyError as error:
        raise ClientError(str(error)) from None
    try:
        with _connected(url, protocol, timeout_s) as (client, call):
            return request(client, security.headers(key, protocol), call)
    except ClientError as error:
        if "restricted" in str(error):
            hint = ("the key sent was not accepted" if key else
                    f"no key found: set {security.KEY_ENV}, pass --admin-key-file, or run this beside `make serve`, "
                    f"which writes {security.GENERATED_KEY_FILE.relative_to(security.REPO_ROOT)}")
            raise ClientError(f"{error} (Triton's {api} API needs the admin key: {hint})", error.status) from None
        raise


def info(url: str | None = None, protocol: str = "http", timeout_s: float = 30.0, admin_key: str | None = None,
         admin_key_file: str | Path | None = None) -> dict[str, str]:
    """What the server serves: the recipe (model, LoRAs, UNet, VAE, scheduler class, step range and
    defaults), from the `scheduler` model's config parameters. Model configs are an admin API: the
    key is `admin_key`, else $SDXL_ADMIN_KEY, else `admin_key_file`, else the one `make serve`
    generated (build/admin-key)."""
    def scheduler_config(client, headers, call):
        if protocol == "http":
            return client.get_model_config("scheduler", headers=headers, **call)
        return client.get_model_config("scheduler", headers=headers, as_json=True, **call)["config"]

    config = _admin_call(url, protocol, timeout_s, admin_key, admin_key_file, "model-config", scheduler_config)
    from contract.recipes import RECIPE_PARAMETERS

    parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    return {key: parameters.get(key, "") for key in RECIPE_PARAMETERS}


def controlnets(url: str | None = None, protocol: str = "http", timeout_s: float = 30.0, admin_key: str | None = None,
                admin_key_file: str | Path | None = None) -> list[str]:
    """The ControlNets the server serves (what Control.name may be): its controlnet_NAME models as NAME and
    its ControlNet-Union models as NAME/MODE (MODE: a control type, docs/controlnet.md), from Triton's
    repository index (an admin API: the key as `info` finds it)."""
    from contract.controlnets import UNION_SEPARATOR
    from contract.networks import UNION_CONTROLNET_NAME, controlnet_name, network_of

    def repository_index(client, headers, call):
        if protocol == "http":
            return client.get_model_repository_index(headers=headers, **call)
        return client.get_model_repository_index(headers=headers, as_json=True, **call).get("models", [])

    index = _admin_call(url, protocol, timeout_s, admin_key, admin_key_file, "model-repository", repository_index)
    models = [entry.get("name", "") for entry in index if controlnet_name(entry.get("name", ""))]
    return sorted(controlnet_name(model) + (f"{UNION_SEPARATOR}MODE" if network_of(model).name == UNION_CONTROLNET_NAME else "")
                  for model in models)


def loras(url: str | None = None, protocol: str = "http", timeout_s: float = 30.0) -> list[dict]:
    """The server's LoRA library, what `lora_names` may name: one dict per LoRA (name, rank,
    networks, targets, parameters, size_bytes, sha256, added), from the `loras` model."""
    import json

    url = url or DEFAULT_URLS[protocol]
    with _connected(url, protocol, timeout_s) as (client, call):
        result = client.infer(LIBRARY_MODEL, [], outputs=[_module(protocol).InferRequestedOutput("loras")], **call)
    listing = result.as_numpy("loras")
    return [json.loads(entry) for entry in (listing if listing is not None else [])]
