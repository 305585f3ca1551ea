"""The admission queue and the process hygiene helpers, without a server (serving/admission.py,
serving/processes.py). The served behaviour is in tests/test_reliability.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from serving.admission import AdmissionPolicy, Refused, RunState, queue_timeout_s
from serving.endpoint import InvalidInput
from serving.processes import clean_stale_regions, clean_stale_run_directories


@pytest.fixture
def run(tmp_path):
    return RunState(tmp_path / "run").create()


def test_admits_loops_plus_the_bound_then_refuses_naming_both(run):
    run.register_loop()  # one loop: this process stands for a scheduler instance
    policy = AdmissionPolicy(max_queue_size=2)
    tickets = [run.admit(policy, None) for _ in range(3)]
    with pytest.raises(Refused, match=r"^server at capacity: 3 requests admitted \(1 denoising loops \+ "
                                      r"max_queue_size 2\); retry later$") as refusal:
        run.admit(policy, None)
    assert refusal.value.reason == "capacity"
    assert run.start(tickets[0]) >= 0  # into the loop: still admitted
    assert run.counts() == (2, 1)
    with pytest.raises(Refused):
        run.admit(policy, None)
    run.finish(tickets[0])  # the loop ends: a place frees
    tickets.append(run.admit(policy, None))
    for ticket in tickets:
        run.finish(ticket)
    assert run.counts() == (0, 0)


def test_a_zero_queue_admits_only_while_a_loop_is_free(run):
    run.register_loop()
    ticket = run.admit(AdmissionPolicy(max_queue_size=0), None)
    with pytest.raises(Refused, match=r"\(1 denoising loops \+ max_queue_size 0\)"):
        run.admit(AdmissionPolicy(max_queue_size=0), None)
    run.start(ticket)
    run.finish(ticket)
    run.admit(AdmissionPolicy(max_queue_size=0), None)


def test_loops_of_dead_processes_do_not_count(run):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run.loops_dir / dead.stdout.strip()).touch()
    run.register_loop()
    assert run.loops() == 1


def test_drain_refuses_everything(run):
    run.set_draining("draining (shutting down)")
    with pytest.raises(Refused, match=r"^server is draining \(shutting down\): not accepting requests") as refusal:
        run.admit(AdmissionPolicy(), None)
    assert refusal.value.reason == "draining"


def test_queue_timeout_is_told_when_a_slot_frees(run):
    ticket = run.admit(AdmissionPolicy(), timeout_s=0.01)
    time.sleep(0.05)
    with pytest.raises(Refused, match=r"^waited \d+ ms for a denoising slot, over its queue_timeout_ms=10; retry later$") as refusal:
        run.start(ticket)
    assert refusal.value.reason == "queue_timeout"
    assert run.counts() == (0, 0)


def test_a_request_admitted_while_a_loop_is_free_is_never_timed_out(run):
    run.register_loop()
    free = run.admit(AdmissionPolicy(), timeout_s=0.001)  # the loop is free: no waiting for a slot
    waiting = run.admit(AdmissionPolicy(), timeout_s=0.001)  # the loop is taken: it waits
    time.sleep(0.01)
    run.start(free)
    with pytest.raises(Refused, match="over its queue_timeout_ms=1"):
        run.start(waiting)


def test_forgotten_tickets_expire(run):
    policy = AdmissionPolicy(max_queue_size=1, ticket_ttl_s=60)  # no loop registered: capacity 1
    ticket = run.admit(policy, None)  # say its request was cancelled before the scheduler
    old = time.time() - 120
    os.utime(run.queued / ticket, (old, old))
    run.admit(policy, None)  # the expired one no longer counts


def test_running_loops_of_dead_processes_do_not_count(run):
    ticket = run.admit(AdmissionPolicy(), None)
    run.start(ticket)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run.running / ticket).write_text(f'{{"admitted": 0, "timeout_s": null, "pid": {int(dead.stdout)}}}')
    assert run.counts() == (0, 0)


def test_tickets_are_file_names_only():
    assert RunState.is_ticket("0123456789abcdef0123456789abcdef")
    assert not RunState.is_ticket("../../etc/passwd") and not RunState.is_ticket("")


def test_not_healthy_reports(run):
    run.report_unhealthy("unet: Stub process 'unet_0_0' is not healthy.")
    run.report_unhealthy("unet: some other failure")
    assert run.unhealthy_reports() == ["unet_0_0"]


@pytest.mark.parametrize("value", ["500", -1, 1.5, True, 10**10])
def test_queue_timeout_parameter_is_checked(value):
    with pytest.raises(InvalidInput, match=r"^queue_timeout_ms: .* expected an integer request parameter from 0 \(no limit\)"):
        queue_timeout_s({"queue_timeout_ms": value}, AdmissionPolicy())


def test_queue_timeout_defaults():
    assert queue_timeout_s({}, AdmissionPolicy()) is None
    assert queue_timeout_s({}, AdmissionPolicy(default_queue_timeout_ms=250)) == 0.25
    assert queue_timeout_s({"queue_timeout_ms": 0}, AdmissionPolicy(default_queue_timeout_ms=250)) is None


def test_policy_from_config_parameters():
    assert AdmissionPolicy.from_parameters({"max_queue_size": "3"}).max_queue_size == 3
    with pytest.raises(ValueError, match=r"max_queue_size='many': expected a int"):
        AdmissionPolicy.from_parameters({"max_queue_size": "many"})
    with pytest.raises(ValueError, match=r"default_queue_timeout_ms='-5': expected 0 or more"):
        AdmissionPolicy.from_parameters({"default_queue_timeout_ms": "-5"})


def test_stale_regions_are_removed_and_live_or_young_ones_kept(tmp_path):
    stale, young, live = (tmp_path / f"triton_python_backend_shm_region_{n}" for n in ("stale", "young", "live"))
    for path in (stale, young, live):
        path.write_bytes(b"\0" * 16)
    for path in (stale, live):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", live.name])  # names it, as a stub does
    try:
        assert clean_stale_regions(tmp_path) == [stale.name]
    finally:
        holder.kill()
        holder.wait()
    assert young.exists() and live.exists() and not stale.exists()


def test_run_directories_of_dead_servers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"sdxl-triton-{int(dead.stdout)}").mkdir()
    (tmp_path / f"sdxl-triton-{os.getpid()}").mkdir()
    assert clean_stale_run_directories(tmp_path) == [f"sdxl-triton-{int(dead.stdout)}"]


def test_a_cancelled_ticket_is_seen_until_it_finishes(run):
    ticket = run.admit(AdmissionPolicy(), None)
    run.start(ticket)
    assert not run.is_cancelled(ticket)
    run.cancel(ticket)  # sdxl_stream, when its client cancels: the denoiser sees it before its next step
    assert run.is_cancelled(ticket)
    run.finish(ticket)
    assert not run.is_cancelled(ticket) and not any(run.cancelled.iterdir())
