"""Shared pieces of the data-stage benchmarks (clean, tokenize, growth): CPU time and
memory of a whole process tree, and the demo-like images they run on.

Why CPU time of the tree: the development machine is shared and heavily loaded, so
wall-clock rates swing widely from one minute to the next. Worse, the kernel schedules
with autogroups (kernel.sched_autogroup_enabled = 1): every process of one session - a
benchmark, its Ray daemons and workers - shares ONE fair slice of the CPUs against every
other busy session, so on a busy machine 2 Ray workers get no more CPU than 1, and a
wall-clock speed-up from 1 to 2 workers cannot show. The CPU seconds a stage spends - its
driver plus every Ray process it starts - hardly depend on the load, so "images per
CPU-second" is the robust form of "images/s per core", and the CPU seconds of the busiest
process (``critical_cpu_s``) give the wall time on a machine with a free core per process.

Roles in a tree (``TreeMonitor``): the root process is the ``driver``; Ray worker
processes (``ray::<Task or Actor>`` titles, ``default_worker.py``) are ``workers``;
everything else Ray starts (gcs_server, raylet, dashboard, agents, log monitor) is
``ray_daemons``. Processes that start and exit between two samples are missed, so
the sampling interval bounds what is lost (a Ray actor lives for a whole stage).
"""
from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field

import psutil

from pipelines.demo_data import encode_image
from pipelines.demo_data.scenes import render_scene

ROLES = ("driver", "workers", "ray_daemons")


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


def _role(proc: psutil.Process, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "driver"
    try:
        cmd = proc.cmdline()
    except (psutil.Error, OSError):
        return "ray_daemons"
    head = cmd[0] if cmd else ""
    if head.startswith("ray::") or any(c.endswith("default_worker.py") for c in cmd[:3]):
        return "workers"
    return "ray_daemons"


def pss_bytes(pid: int) -> int | None:
    """Proportional set size from /proc/<pid>/smaps_rollup (shared pages split between
    the processes that map them, so a tree's sum counts Ray's shared object store once)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class TreeUsage:
    """What a process tree used while a TreeMonitor watched it."""
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ROLES, 0.0))
    peak_rss: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))  # largest single process
    peak_tree_rss: int = 0     # sum over the tree at one sample (shared pages counted per process)
    peak_tree_pss: int = 0     # sum of PSS at one sample (0 unless pss=True)
    samples: int = 0
    max_processes: int = 0
    worker_cpu_s: list[float] = field(default_factory=list)  # per Ray worker process, largest first

    @property
    def critical_cpu_s(self) -> float:
        """CPU seconds of the busiest single process: the wall time this run would need on
        a machine with a free core per process (a lower bound; what autogroup hides)."""
        return max([self.cpu_s["driver"], *self.worker_cpu_s], default=0.0)

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu_s.values())

    @property
    def cpu_work(self) -> float:
        """Driver + Ray workers: what the stage's own code ran (without Ray's daemons)."""
        return self.cpu_s["driver"] + self.cpu_s["workers"]


class TreeMonitor:
    """Sample CPU time and memory of ``root_pid`` and all its descendants in a thread.

    with TreeMonitor() as mon:   # the current process and its children (e.g. Ray)
        work()
    mon.usage.cpu_s["workers"], mon.usage.peak_rss["driver"], ...

    The sampler's own CPU time is subtracted from the driver's when the root is this
    process. ``pss=True`` also sums PSS (slower: one /proc read per process and sample).
    """

    def __init__(self, root_pid: int | None = None, interval: float = 0.2, pss: bool = False):
        self.root_pid = root_pid or os.getpid()
        self.interval, self.pss = interval, pss
        self.usage = TreeUsage()
        self._start_cpu: dict[tuple[int, float], float] = {}
        self._last_cpu: dict[tuple[int, float], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._sampler_cpu = 0.0
        self._roles: dict[tuple[int, float], str] = {}

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root_pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample(self, first: bool = False) -> None:
        tree_rss = tree_pss = 0
        procs = self._tree()
        for proc in procs:
            try:
                key = (proc.pid, proc.create_time())
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    rss = proc.memory_info().rss
            except (psutil.Error, OSError):
                continue
            role = self._roles.get(key) or self._roles.setdefault(key, _role(proc, self.root_pid))
            total = cpu.user + cpu.system
            if first:
                self._start_cpu[key] = total
            self._last_cpu[key] = (role, total)
            self.usage.peak_rss[role] = max(self.usage.peak_rss[role], rss)
            tree_rss += rss
            if self.pss:
                tree_pss += pss_bytes(proc.pid) or rss
        self.usage.peak_tree_rss = max(self.usage.peak_tree_rss, tree_rss)
        self.usage.peak_tree_pss = max(self.usage.peak_tree_pss, tree_pss)
        self.usage.max_processes = max(self.usage.max_processes, len(procs))
        self.usage.samples += 1

    def _loop(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(self.interval):
            self._sample()
        self._sample()
        self._sampler_cpu = time.thread_time() - start

    def __enter__(self) -> "TreeMonitor":
        self._sample(first=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.usage.wall_s = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        for key, (role, total) in self._last_cpu.items():
            used = total - self._start_cpu.get(key, 0.0)
            self.usage.cpu_s[role] += used
            if role == "workers":
                self.usage.worker_cpu_s.append(used)
        self.usage.worker_cpu_s.sort(reverse=True)
        if self.root_pid == os.getpid():
            self.usage.cpu_s["driver"] = max(0.0, self.usage.cpu_s["driver"] - self._sampler_cpu)


# ----------------------------------------------------------------------------- inputs

def scene_images(n: int, size: int, fmt: str = "png", seed: int = 0,
                 height: int | None = None) -> list[bytes]:
    """``n`` demo scenes (pipelines.demo_data.scenes) encoded as the demo encodes them; ``height``
    crops a size x size scene to size x height (e.g. 640 x 480 photo-sized inputs)."""
    rng = random.Random(f"bench/{seed}/{size}")
    out = []
    for _ in range(n):
        image, _, _ = render_scene(rng, size)
        if height is not None and height != size:
            image = image.crop((0, (size - height) // 2, size, (size - height) // 2 + height))
        out.append(encode_image(image, fmt))
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


__all__ = ["TreeMonitor", "TreeUsage", "ROLES", "load_note", "pss_bytes", "scene_images", "mib", "ratio"]
