"""Real-time sessions on `sdxl_stream` (docs/batching-and-streaming.md, "Sessions"): a client paints on one
gRPC stream, each frame a request with the same `session_id`, and the latest frame wins. A session has at
most one frame denoising at a time; a frame that has not started when a newer frame of its session arrives
is answered at once as skipped and never reaches the networks; a frame already running finishes.

Which frame is newer is the client's order where the client gives it: a request id that is a whole number
(`generate_session` sends 0, 1, 2...). The stream's instances take a stream's requests in order but check
them in parallel, so the order in which they reach this file is not always the order they were sent in: a
frame numbered by its arrival here could supersede a frame sent after it (the client's newest frame
skipped). Frames without such an id are numbered 1, 2, 3... as they arrive here.

The stream's instances are separate processes, so a session's state lives in the server's run directory
(serving/admission.py), beside the admission queue, guarded by flock(2):

    <run>/sessions/<key>.latest    the number of the session's newest frame (one line)
    <run>/sessions/<key>.present   shared-locked by every frame of the session still in the server
    <run>/sessions/<key>.running   locked by the instance denoising one of its frames

`<key>` is a hash of the session id (any UTF-8 text: no path is made of it). A frame takes its number when
it arrives (after its inputs are checked), then waits for the session's lock, asking every POLL_S whether
a newer frame arrived. A frame that arrives when none of its session is present starts the session's
numbering again (a client reusing its session id on a new stream numbers from 0 again); a dead process's
locks go with it. The files of a session that sent nothing for IDLE_S go; the run directory goes with the
server.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .endpoint import Cancelled, InvalidInput, _one

SESSION_ID_MAX_BYTES = 128
FRAME_ORDER_MAX_DIGITS = 18  # a request id of up to this many digits orders the frames (fits the file's 20)
POLL_S = 0.002  # how often a waiting frame looks for a newer one: what "answered at once" costs
IDLE_S = 600.0  # a session's files go after this long without a frame


def check_session_id(array: np.ndarray | None) -> str | None:
    """The request's session_id (BYTES [1], 1 to SESSION_ID_MAX_BYTES of UTF-8); None without one."""
    value = _one("session_id", array)
    if value is None:
        return None
    accepted = f"UTF-8 text of 1 to {SESSION_ID_MAX_BYTES} bytes (BYTES, shape [1]): the stream's session"
    if not isinstance(value, (bytes, np.bytes_, str)):
        raise InvalidInput("session_id", value, accepted)
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
    if not 1 <= len(data) <= SESSION_ID_MAX_BYTES:
        raise InvalidInput("session_id", f"<{len(data)} bytes>", accepted)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("session_id", data[:40], accepted) from None


def frame_order(request_id: str) -> int | None:
    """The client's order of a frame: its request id when that is a whole number, else None (arrival order)."""
    if request_id.isascii() and request_id.isdigit() and len(request_id) <= FRAME_ORDER_MAX_DIGITS:
        return int(request_id)
    return None


class Frame:
    """A frame of a session in the server: its `number` (newer frames have greater ones) and its presence,
    which keeps the session's numbering; leave() when it was answered (a dead process leaves by itself)."""

    def __init__(self, number: int, descriptor: int):
        self.number, self._descriptor = number, descriptor

    def leave(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)  # closing releases the shared lock
            self._descriptor = -1


class Turn:
    """A frame's hold on its session: release() when it is done (or failed)."""

    def __init__(self, descriptor: int):
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor >= 0:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = -1


class Sessions:
    """The sessions of one tritonserver, shared by its sdxl_stream instances through `run_directory`."""

    def __init__(self, run_directory: Path):
        self.directory = Path(run_directory) / "sessions"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._swept = 0.0

    def _path(self, session: str, suffix: str) -> Path:
        return self.directory / f"{hashlib.sha256(session.encode('utf-8')).hexdigest()[:32]}.{suffix}"

    def arrive(self, session: str, order: int | None = None) -> Frame:
        """A frame of `session` arrives: numbered by the client's `order` (frame_order) when it has one, else
        as the session's newest (the last number + 1). A frame whose order is not newer than the session's
        newest is stale from the start (wait_turn skips it), unless none of its session is present: then
        its order starts the session again."""
        self._sweep()
        descriptor = os.open(self._path(session, "latest"), os.O_RDWR | os.O_CREAT, 0o600)
        present = os.open(self._path(session, "present"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # one arrival at a time: only arrivals lock `present` exclusively
            try:
                fcntl.flock(present, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
            fcntl.flock(present, fcntl.LOCK_SH)  # present from now on (from exclusive: no one else can take it)
            newest = _read_number(descriptor)
            number = newest + 1 if order is None else order
            if order is None or alone or order > newest:
                os.pwrite(descriptor, f"{number:020d}\n".encode(), 0)
            return Frame(number, present)
        except BaseException:
            os.close(present)
            raise
        finally:
            os.close(descriptor)  # closing releases the lock

    def latest(self, session: str) -> int:
        try:
            descriptor = os.open(self._path(session, "latest"), os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH)
            return _read_number(descriptor)
        finally:
            os.close(descriptor)

    def wait_turn(self, session: str, frame: int, cancelled: Callable[[], bool] = lambda: False) -> Turn | None:
        """The session's hold for `frame` once no other frame of it runs; None as soon as a newer frame of
        the session has arrived (this one is skipped). Cancelled when the client cancels while it waits."""
        descriptor = os.open(self._path(session, "running"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                if self.latest(session) > frame:
                    os.close(descriptor)
                    return None
                if cancelled():
                    raise Cancelled("cancelled by the client while the session's previous frame ran")
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(POLL_S)
        except BaseException:
            os.close(descriptor)
            raise
        turn = Turn(descriptor)
        if self.latest(session) > frame:  # a newer frame arrived while the lock was taken
            turn.release()
            return None
        return turn

    def _sweep(self) -> None:
        """Remove the files of sessions idle for IDLE_S (at most once a minute per process)."""
        now = time.time()
        if now - self._swept < 60:
            return
        self._swept = now
        for path in self.directory.glob("*.latest"):
            try:
                if now - path.stat().st_mtime > IDLE_S:
                    path.unlink(missing_ok=True)
                    for suffix in (".running", ".present"):
                        path.with_suffix(suffix).unlink(missing_ok=True)
            except OSError:
                pass


def _read_number(descriptor: int) -> int:
    text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else 0
