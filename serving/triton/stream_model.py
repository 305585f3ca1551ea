"""`sdxl_stream`: the streaming endpoint (decoupled: gRPC streams only). The inputs of `ensemble_sdxl`
plus `preview_every`; one response per denoising step (`step`, `num_inference_steps`, `seeds`, and
`images` on every `preview_every`-th step: a preview from the `preview_decoder`), then the final
images (checked, watermarked and encoded as `ensemble_sdxl`'s postprocess does, serving/outputs.py) with the
FINAL flag, or one error response. Only the outputs the client asked for are sent.

Each request runs here synchronously: its texts checked, tokenized and the request admitted or refused
here, as the ensemble's `tokenizer` model does it (serving/text.py TextInputs, with the tokenizer's config:
one hop less a frame), then through BLS: text_encoder -> denoiser (the continuous-batching engine,
decoupled) -> preview_decoder for previews -> vae_decoder for the final images. One request per instance at a
time: the instances are the streams in flight (worker threads doing BLS crashed tritonserver 2.51,
docs/batching-and-streaming.md). A cancelled stream (`is_cancelled`) is seen at the next step; 2.51
cannot cancel a BLS request, so the request's admission ticket is marked cancelled in the run
directory, which the denoiser checks before every step.

Config parameters: the endpoint's limits and the recipe (as the scheduler's; a test keeps them equal),
apply_watermark and safety_checker (as postprocess's). The texts' limits and the admission policy are the
tokenizer's config parameters (max_prompt_bytes, max_queue_size...), read from its config at load.
"""

from __future__ import annotations

import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from contract.layout import TOKENIZER_MODEL
from contract.networks import DENOISER, PREVIEW_DECODER, TEXT_ENCODER, VAE_DECODER
from serving.admission import Refused, RunState, queue_timeout_s, run_directory
from serving.endpoint import CHECKED_INPUTS, Cancelled, check_options, check_preview_every
from serving.sessions import Sessions, check_session_id, frame_order
from serving.text import TEXT_INPUTS

from .common import (ComponentError, bls_request, control_tensors, endpoint_finisher, error_response, image_tensors, infer,
                     input_arrays, ip_adapter_tensors, lora_tensors, option_tensors, request_parameters, ticket_tensor, traced)
from .metrics import AdmissionMetrics, StreamMetrics
from .settings import ModelSettings
from .tokenizer_model import text_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        settings = ModelSettings.from_args(args, "sdxl_stream")
        self.limits, self.controlnets, self.ip_adapter = settings.limits, settings.controlnets, settings.ip_adapter
        self.run = RunState(run_directory(os.getppid())).create()  # the stub's parent is tritonserver
        self.sessions = Sessions(self.run.directory)
        tokenizer = settings.sibling(TOKENIZER_MODEL)  # its work is done here, by its config
        self.policy, self.text_inputs = tokenizer.admission, text_inputs(tokenizer)
        try:  # its errors name the model already
            self.finisher = endpoint_finisher(settings, self.run)
        except ValueError as error:
            raise pb_utils.TritonModelException(str(error)) from None
        self.metrics = StreamMetrics(args["model_name"])
        self.admission_metrics = AdmissionMetrics(args["model_name"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                with traced(request):
                    self._stream(request, sender)
            except Exception as error:  # noqa: BLE001 - one request's failure must not reach the others
                self._send_final_error(sender, error)
        return None

    def _send_final_error(self, sender, error: Exception) -> None:
        callee = getattr(error, "callee_error", None)
        if callee is not None:  # the callee's error as it came: INVALID_ARG stays INVALID_ARG
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(callee.message(), callee.code()))
        else:
            response = error_response(error, "sdxl_stream")
        try:
            sender.send(response, flags=FINAL)
        except Exception:  # noqa: BLE001 - the client is gone (a cancelled stream): nobody to tell
            pass

    # 1. check the options before any work
    def _check(self, request):
        raw = input_arrays(request, (*CHECKED_INPUTS, "preview_every", "session_id"))
        return (check_options(raw, self.limits, controlnets=self.controlnets, ip_adapter=self.ip_adapter),
                check_preview_every(raw["preview_every"], self.limits), check_session_id(raw["session_id"]))

    # 2. check the texts, tokenize and admit, as the tokenizer model does (in this process: no hop)
    def _tokenize(self, request, options) -> tuple[list, str]:
        """The text encoder's inputs (token ids and the texts' LoRA weights) and the admission ticket."""
        raw = input_arrays(request, TEXT_INPUTS)
        raw["guidance_scale"] = np.asarray([options.guidance_scale], dtype=np.float32)  # the checked one: CFG or not
        tensors = self.text_inputs(raw)  # before admission: bad input costs no place
        try:
            ticket = self.run.admit(self.policy, queue_timeout_s(request_parameters(request), self.policy))
        except Refused as refusal:
            self.admission_metrics.refused(refusal.reason)
            raise
        self.admission_metrics.admitted.increment(1)
        return [pb_utils.Tensor(name, tensors[name]) for name in TEXT_ENCODER.input_names], ticket

    # 3. encode the texts
    def _encode(self, ids: list) -> list:
        response = infer(TEXT_ENCODER.name, ids, TEXT_ENCODER.output_names, self.run)
        return [pb_utils.get_output_tensor_by_name(response, name) for name in TEXT_ENCODER.output_names]

    def _stream(self, request, sender) -> None:
        start = time.monotonic()
        options, every, session = self._check(request)
        if session is None:
            return self._frame(request, sender, start, options, every)
        # A session's frame: numbered in the client's order (its request id) or on arrival, then it waits for
        # the session's previous frame, unless a newer one arrives first (latest wins: it is answered as
        # skipped and never reaches a network).
        frame = self.sessions.arrive(session, frame_order(request.request_id()))
        try:
            turn = self.sessions.wait_turn(session, frame.number, sender.is_cancelled)
            if turn is None:
                self.metrics.skipped.increment(1)
                seeds = np.asarray(options.seeds, dtype=np.int64)
                self._send(sender, 0, options.num_inference_steps, seeds, [pb_utils.Tensor("skipped", np.asarray([True]))], FINAL)
                return None
            try:
                return self._frame(request, sender, start, options, every, turn)
            finally:
                turn.release()
        finally:
            frame.leave()

    def _frame(self, request, sender, start: float, options, every: int, turn=None) -> None:
        """One request (a session's frame holds its `turn`: its final response says skipped false)."""
        tensors = option_tensors(options, request)  # the checked values, for the denoiser
        ids, ticket = self._tokenize(request, options)
        try:
            self._start(ticket)
            self.metrics.in_flight.increment(1)
            try:
                embeddings = self._encode(ids)
                if sender.is_cancelled():
                    raise Cancelled("cancelled by the client before denoising")
                self._denoise(sender, embeddings + tensors + lora_tensors(request) + image_tensors(request)
                              + control_tensors(request) + ip_adapter_tensors(request), options, every,
                              ticket, start, set(request.requested_output_names()), turn)
            finally:
                self.metrics.in_flight.increment(-1)
        finally:
            self.run.finish(ticket)  # whatever happened: its place is free

    def _start(self, ticket: str) -> None:
        try:
            self.run.start(ticket)
        except Refused as refusal:
            self.admission_metrics.refused(refusal.reason)
            raise

    # 4. denoise in the engine, answering at every step; 5. decode previews and the final images
    def _denoise(self, sender, inputs: list, options, every: int, ticket: str, start: float, wanted: set,
                 turn=None) -> None:
        """`inputs`: the embeddings and the option tensors; `wanted`: the outputs the client asked for
        (images: previews and final pixels; encoded_images: the final files); `turn`: a session's frame's hold on
        its session (serving.sessions.Turn), held until its final images are ready, released before they are
        sent (a client that sends its next frame on this one's answer finds the session free). Releasing it once
        the final latents were out, so that the session's next frame denoised while this one was decoded, raised
        a session's latency p95 at twice the server's rate from 1.5 to 3 frame times on 2 cores (the two frames
        shared them; docs/img2img.md)."""
        steps = options.num_inference_steps
        seeds = np.asarray(options.seeds, dtype=np.int64)
        # A response after every step, previews or not: the stream's cancellation is checked on each.
        inputs = inputs + [pb_utils.Tensor("preview_every", np.asarray([1], dtype=np.int32)), ticket_tensor(ticket)]
        engine = bls_request(DENOISER, inputs, ["latents", "step"])
        cancelled_at = None
        for response in engine.exec(decoupled=True):
            if response.has_error():  # 2.51 drops them (below); kept for releases that deliver them
                self.run.report_unhealthy(response.error().message())
                raise ComponentError(f"{DENOISER}: {response.error().message()}", response.error())
            step_tensor = pb_utils.get_output_tensor_by_name(response, "step")
            if step_tensor is None:  # the empty closing response of a decoupled stream
                continue
            step = int(step_tensor.as_numpy().reshape(-1)[0])
            latents = pb_utils.get_output_tensor_by_name(response, "latents")
            if cancelled_at is not None:
                continue  # drain: the denoiser stops at its next step
            if sender.is_cancelled():
                cancelled_at = time.monotonic()
                self.run.cancel(ticket)
                continue
            if step == steps:
                decoded = infer(VAE_DECODER.name, [latents], VAE_DECODER.output_names, self.run)
                images = pb_utils.get_output_tensor_by_name(decoded, "images")
                skipped = [pb_utils.Tensor("skipped", np.asarray([False]))] if turn is not None else []
                finished = self._finish(images, options, wanted) + skipped
                if turn is not None:  # done: the session's next frame may start while this one is sent
                    turn.release()
                self._send(sender, step, steps, seeds, finished, FINAL)
                self.metrics.request_seconds.observe(time.monotonic() - start)
                return
            preview = None
            if every and step % every == 0:
                decoded = infer(PREVIEW_DECODER.name, [latents], PREVIEW_DECODER.output_names, self.run)
                preview = pb_utils.get_output_tensor_by_name(decoded, "images")
                if step == every:
                    self.metrics.first_preview.observe(time.monotonic() - start)
            self._send(sender, step, steps, seeds, [preview if "images" in wanted else None], 0)
        # The responses ended without the final latents. A decoupled BLS caller never sees its callee's
        # error responses on 2.51, only the empty FINAL one that follows: the denoiser logs the error.
        if cancelled_at is not None:  # the denoiser dropped the request: its batch slot is free
            self.metrics.cancel_to_free.observe(time.monotonic() - cancelled_at)
            self.metrics.cancellations.increment(1)
            raise Cancelled("cancelled by the client; the denoiser dropped the request")
        raise ComponentError(f"{DENOISER}: the request ended without its final latents (the error is in the server log)")

    # 6. the final images as the request asks: checked, watermarked, encoded (serving/outputs.py)
    def _finish(self, images, options, wanted) -> list:
        """The final response's images, encoded_images and nsfw_detected, each if there is one and it was asked for."""
        if not self.finisher.changes(options.output):
            return [images if "images" in wanted else None]
        finished, files, flags = self.finisher.finish(images.as_numpy(), options.output)
        outputs = {"images": finished, "encoded_images": None if files is None else np.asarray(files, dtype=object),
                   "nsfw_detected": flags}
        return [pb_utils.Tensor(name, value) for name, value in outputs.items() if value is not None and name in wanted]

    @staticmethod
    def _send(sender, step: int, steps: int, seeds: np.ndarray, outputs: list, flags: int) -> None:
        tensors = [pb_utils.Tensor("step", np.asarray([step], dtype=np.int32)),
                   pb_utils.Tensor("num_inference_steps", np.asarray([steps], dtype=np.int32)),
                   pb_utils.Tensor("seeds", seeds)]
        tensors += [tensor for tensor in outputs if tensor is not None]
        sender.send(pb_utils.InferenceResponse(tensors), flags=flags)
