"""`python -m client PROMPT --session SOURCE`: a real-time painting session on `sdxl_stream` (generate_session):
frames read from SOURCE (a directory of images, in name order, or a video file through OpenCV when it is
installed), sent at --fps on one gRPC stream, each frame the init image of an img2img request at
--strength; the prompt is re-read from --prompt-file whenever that file changes. What comes back is written
as OUTPUT_DIR/frame_<index>.png, a line per frame, then frames per second, latency and skipped counts."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from . import ClientError, generate_session

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_frames(source: Path) -> Iterator[np.ndarray]:
    """uint8 RGB frames of a directory of images (sorted by name) or of a video file (OpenCV)."""
    if source.is_dir():
        from PIL import Image

        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ClientError(f"--session {source}: no images ({', '.join(IMAGE_SUFFIXES)}) in the directory")
        for path in paths:
            with Image.open(path) as image:
                yield np.asarray(image.convert("RGB"))
        return
    try:
        import cv2
    except ImportError:
        raise ClientError(f"--session {source}: reading a video needs OpenCV (pip install opencv-python-headless); "
                          "or pass a directory of frames") from None
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise ClientError(f"--session {source}: not a directory of images, and OpenCV cannot read it as a video")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


class PromptSource:
    """The session's prompt: the command line's, or --prompt-file's text, re-read when the file changes."""

    def __init__(self, prompt: str | None, path: Path | None):
        self.prompt, self.path, self._stamp = prompt, path, None

    def current(self) -> str:
        if self.path is not None:
            stamp = self.path.stat().st_mtime_ns
            if stamp != self._stamp:
                self.prompt, self._stamp = self.path.read_text().strip(), stamp
        if not self.prompt:
            raise ClientError("the session's prompt is empty: give one, or text in --prompt-file")
        return self.prompt


def paced(frames: Iterator[np.ndarray], fps: float, prompt: PromptSource, strength: float) -> Iterator[dict]:
    """Each frame as a request's options, released at `fps` frames per second (0: as fast as they are read)."""
    start = time.perf_counter()
    for index, frame in enumerate(frames):
        if fps > 0:
            time.sleep(max(0.0, start + index / fps - time.perf_counter()))
        yield {"prompt": prompt.current(), "image": frame, "strength": strength}


def run_session(source: Path, output: Path, prompt: str | None, prompt_file: Path | None, fps: float, strength: float,
                **options) -> int:
    """Stream the frames, write the answers, print the summary; 0, or 1 on an error."""
    from PIL import Image

    output.mkdir(parents=True, exist_ok=True)
    latencies, skipped, written = [], 0, 0
    start = time.perf_counter()
    try:
        frames = paced(read_frames(source), fps, PromptSource(prompt, prompt_file), strength)
        for frame in generate_session(frames, **options):
            if frame.skipped:
                skipped += 1
                print(f"frame {frame.index:5d}  skipped  ({frame.seconds * 1000:.0f} ms)")
                continue
            latencies.append(frame.seconds)
            path = output / f"frame_{frame.index:05d}.png"
            Image.fromarray(frame.images[0]).save(path)
            written += 1
            elapsed = time.perf_counter() - start
            print(f"frame {frame.index:5d}  {frame.seconds * 1000:6.0f} ms  {written / elapsed:5.2f} fps  {path}")
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    if latencies:
        ordered = sorted(latencies)
        p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
        print(f"{written} frame(s) in {elapsed:.2f} s: {written / elapsed:.2f} fps, latency median "
              f"{statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms; {skipped} skipped")
    else:
        print(f"no frame answered with an image in {elapsed:.2f} s; {skipped} skipped")
    return 0
