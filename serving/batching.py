"""Running the requests that Triton's dynamic batcher hands over together as one batch.

Requests merge only when all their inputs agree beyond the batch axis (same image size, same model
widths); each group runs once, and its outputs are split back per request.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


def group_by_shape(requests: Sequence[Arrays], names: Sequence[str]) -> list[list[int]]:
    """Indices of `requests` grouped by their inputs' shapes past the batch axis, in arrival order."""
    groups: dict[tuple, list[int]] = {}
    for index, inputs in enumerate(requests):
        groups.setdefault(tuple(inputs[name].shape[1:] for name in names), []).append(index)
    return list(groups.values())


def run_concatenated(
    run: Callable[[Arrays], Sequence[np.ndarray]], batch: Sequence[Arrays], input_names: Sequence[str],
    output_names: Sequence[str], max_rows: int = 0,
) -> list[Arrays]:
    """Concatenate `batch` along axis 0, call `run` once (or once per `max_rows` rows when set: the
    peak memory of a run grows with its rows), split every output back per request."""
    feed = {name: np.concatenate([inputs[name] for inputs in batch]) for name in input_names}
    rows = len(feed[input_names[0]])
    step = max_rows or rows
    chunks = [run({name: value[start:start + step] for name, value in feed.items()}) for start in range(0, rows, step)]
    results = [np.concatenate(parts) for parts in zip(*chunks)]
    boundaries = np.cumsum([inputs[input_names[0]].shape[0] for inputs in batch])[:-1]
    pieces = [np.split(result, boundaries) for result in results]
    return [{name: pieces[k][j] for k, name in enumerate(output_names)} for j in range(len(batch))]
