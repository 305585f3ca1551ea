"""What the supervisor sees of a tritonserver from the outside: its Python-backend stub processes,
and the shared-memory regions and run directories that a killed server leaves behind."""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .admission import RUN_DIR_PREFIX, runs_root

SHM_DIR = Path("/dev/shm")
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"
STUB_BINARY = "triton_python_backend_stub"
# A region younger than this may belong to a server that is starting and has not launched the
# stub that names it yet: never removed.
YOUNG_REGION_S = 60.0


@dataclass(frozen=True)
class Stub:
    instance: str  # Triton's instance name, e.g. scheduler_0_1
    pid: int
    region: str  # its shared-memory region's file name in /dev/shm

    @property
    def model(self) -> str:
        return self.instance.rsplit("_", 2)[0]


def stubs_of(server_pid: int) -> list[Stub]:
    """The server's Python-backend stubs, zombies included. A stub's command line is
    `triton_python_backend_stub <model.py> <region> <sizes...> <parent pid> <backend dir> <...> <instance> <kind>`."""
    stubs = []
    try:
        children = psutil.Process(server_pid).children()
    except psutil.NoSuchProcess:
        return []
    for child in children:
        try:
            args = child.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue  # a zombie has no command line: the watcher knows it by pid
        if args and args[0].endswith(STUB_BINARY) and len(args) >= 3:
            stubs.append(Stub(instance=args[-2], pid=child.pid, region=args[2]))
    return stubs


def stub_problem(stub: Stub) -> str | None:
    """None while the stub's process runs; else what is wrong with it: exited, zombie (died, not
    reaped: what Triton 2.51 leaves of a killed stub) or stopped."""
    try:
        status = psutil.Process(stub.pid).status()
    except psutil.NoSuchProcess:
        return "exited"
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return "zombie"
    if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return "stopped"
    return None


def regions_in_use() -> set[str]:
    """Region names that a live process names on its command line (each stub names its own)."""
    names = set()
    for process in psutil.process_iter(["cmdline"]):
        for arg in process.info["cmdline"] or ():
            if arg.startswith(SHM_REGION_PREFIX):
                names.add(arg)
    return names


def clean_stale_regions(shm: Path = SHM_DIR) -> list[str]:
    """Remove the Python backend's shared-memory regions that no live process uses: a killed
    tritonserver leaves them in /dev/shm (DESIGN.md), where they hold memory until the pod ends."""
    if not shm.is_dir():
        return []
    in_use = regions_in_use()
    removed = []
    for path in shm.glob(f"{SHM_REGION_PREFIX}*"):
        try:
            if path.name in in_use or time.time() - path.stat().st_mtime < YOUNG_REGION_S:
                continue
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed


def clean_stale_run_directories(root: Path | None = None) -> list[str]:
    """Remove the admission run directories of tritonserver processes that no longer exist."""
    root = root or runs_root()
    removed = []
    for path in root.glob(f"{RUN_DIR_PREFIX}*"):
        match = re.fullmatch(rf"{RUN_DIR_PREFIX}(\d+)", path.name)
        if match and not psutil.pid_exists(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def remove_regions(stubs, shm: Path = SHM_DIR) -> None:
    """Remove the regions of a killed server's stubs."""
    for stub in stubs:
        (shm / stub.region).unlink(missing_ok=True)


def region_sizes(stubs: list[Stub], shm: Path = SHM_DIR) -> dict[str, int]:
    """Bytes of /dev/shm each stub's region holds now (regions grow by 1 MiB chunks, never shrink)."""
    sizes = {}
    for stub in stubs:
        try:
            sizes[stub.instance] = (shm / stub.region).stat().st_size
        except FileNotFoundError:
            pass
    return sizes
