"""Progress lines for long steps: what is happening, and how long it took."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


def log(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


@contextmanager
def step(what: str):
    """Print `what…` before a long step and its duration after it."""
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    log(f"{what}: done in {time.perf_counter() - start:.1f} s")
