"""serving.server: the launcher's failure paths and choices (the happy path runs in test_serving.py)."""

from __future__ import annotations

import os

import pytest

from serving.server import ServerError, TritonServer, auto_variant, free_ports


def test_server_that_cannot_start_reports_its_log_and_leaves_nothing(tmp_path):
    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\n')
    server = TritonServer(tmp_path / "repo", "cpu", *free_ports(3), log_file=tmp_path / "log")
    # Whichever comes first: the failed load in the log, or tritonserver's exit.
    with pytest.raises(ServerError, match=r"(model broken failed to load: .*|tritonserver exited with code \d+ while starting); "
                                          r"last lines of .*log"):
        server.start(timeout_s=120)
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process.pid, 0)


def test_unknown_variant(tmp_path):
    with pytest.raises(ServerError, match="variant 'gpu': expected one of cpu, production"):
        TritonServer(tmp_path, "gpu").start()


def test_auto_variant_is_cpu_without_plans(tmp_path):
    assert auto_variant(tmp_path) == "cpu"
