"""serving.batching: requests merged per shape, run once, split back in order."""

from __future__ import annotations

import numpy as np

from serving.batching import group_by_shape, run_concatenated


def request(batch: int, size: int, fill: float) -> dict[str, np.ndarray]:
    return {"sample": np.full((batch, 4, size, size), fill, np.float32), "timestep": np.full((batch,), fill, np.float32)}


def test_groups_by_shape_past_the_batch_axis():
    requests = [request(1, 16, 0), request(2, 24, 1), request(3, 16, 2), request(1, 24, 3)]
    assert group_by_shape(requests, ["sample", "timestep"]) == [[0, 2], [1, 3]]


def test_runs_once_and_splits_per_request():
    calls = []

    def run(feed):
        calls.append(feed["sample"].shape[0])
        return [feed["sample"] * 2, feed["timestep"] + 1]

    batch = [request(1, 8, 1.0), request(3, 8, 2.0), request(2, 8, 3.0)]
    outputs = run_concatenated(run, batch, ["sample", "timestep"], ["noise_pred", "t"])
    assert calls == [6]
    assert [o["noise_pred"].shape[0] for o in outputs] == [1, 3, 2]
    for inputs, out in zip(batch, outputs):
        np.testing.assert_array_equal(out["noise_pred"], inputs["sample"] * 2)
        np.testing.assert_array_equal(out["t"], inputs["timestep"] + 1)


def test_max_rows_splits_the_run_not_the_answer():
    calls = []

    def run(feed):
        calls.append(feed["sample"].shape[0])
        return [feed["sample"] * 2, feed["timestep"] + 1]

    batch = [request(1, 8, 1.0), request(3, 8, 2.0), request(2, 8, 3.0)]
    outputs = run_concatenated(run, batch, ["sample", "timestep"], ["noise_pred", "t"], max_rows=4)
    assert calls == [4, 2]
    for inputs, out in zip(batch, outputs):
        np.testing.assert_array_equal(out["noise_pred"], inputs["sample"] * 2)
        np.testing.assert_array_equal(out["t"], inputs["timestep"] + 1)
