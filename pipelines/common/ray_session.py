"""The one place that connects to Ray.

``ray.address`` null starts a local instance sized to the machine, unless the
environment names a cluster in ``RAY_ADDRESS`` (a Ray Job's driver runs with it set to
its cluster): then the stage joins that cluster, as ``ray.init()`` itself would.
"auto" or "host:port" joins an existing cluster.

Progress: on a terminal Ray Data draws its progress bars; when stdout is not a terminal
(CI, a Ray Job's log, ``dvc repro > log``) Ray Data logs a short progress block every
``progress_log_s`` seconds instead (no bars, so no tqdm floods). Stages that run plain
Ray tasks (:func:`bounded_tasks`) print their own line at the same interval.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
from dataclasses import dataclass

from pipelines.common.configs import check


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    # Logical CPUs of a local instance. More than the physical cores on purpose:
    # on a 2-core machine two 1-CPU actors would starve Ray Data's read tasks.
    num_cpus: int | None = None
    # CPUs each map task / actor asks for; fractional so small machines never deadlock.
    cpus_per_task: float = 0.5
    # Seconds Ray Data, or a stage's plain Ray tasks (bounded_tasks), may make no progress before
    # the stage fails (Ray Data's default is 30 min).
    no_progress_timeout_s: int = 600
    # Seconds between Ray Data's progress blocks in non-terminal logs (rows done per operator).
    progress_log_s: int = 30

    def __post_init__(self):
        check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus: must be >= 1 or null")
        check(0 < self.cpus_per_task <= 64, "ray.cpus_per_task: must be in (0, 64]")
        check(self.no_progress_timeout_s > 0, "ray.no_progress_timeout_s: must be > 0")
        check(self.progress_log_s > 0, "ray.progress_log_s: must be > 0")


def local_num_cpus(config: RayConfig) -> int:
    return config.num_cpus or max(4, 2 * (os.cpu_count() or 1))


@contextlib.contextmanager
def ray_session(config: RayConfig):
    """Connect (or start), yield the ``ray`` module, and shut down on exit."""
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", str(config.no_progress_timeout_s))
    # Read by Ray Data's logging progress (used when stdout is not a TTY) at its first dataset.
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(config.progress_log_s))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():  # the caller (a test, a Ray Job driver) already connected
        yield ray
        return
    project_root = os.getcwd()
    runtime_env = {"env_vars": {"PYTHONPATH": _pythonpath(project_root)}}
    address = cluster_address(config)
    if address is None:
        ray.init(
            num_cpus=local_num_cpus(config),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
    else:
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_address(config: RayConfig) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS``; None starts a local instance."""
    if config.address is not None:
        return config.address
    env = os.environ.get("RAY_ADDRESS") or None
    if env is not None and env.startswith(("http://", "https://")):
        raise ValueError(f"RAY_ADDRESS={env} is a Jobs API (dashboard) address, not a cluster to join: "
                         "unset it to run the stages on a local Ray (for `ray job submit`, use "
                         "--address or RAY_API_SERVER_ADDRESS), or set ray.address to the cluster")
    return env


def _pythonpath(root: str) -> str:
    existing = os.environ.get("PYTHONPATH")
    return root if not existing else f"{root}{os.pathsep}{existing}"


def cluster_cpus(ray) -> int:
    """Logical CPUs of the cluster: the in-flight limit of :func:`bounded_tasks` (one task per
    CPU bounds memory, and Ray reuses its idle worker processes instead of starting one per
    fractional-CPU slot: each start re-imports the stage's libraries)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def spread_task(ray, fn, num_cpus: float):
    """``fn`` as a Ray task of ``num_cpus`` CPUs spread over the cluster's nodes, as Ray Data
    schedules its own tasks (Ray's default packs tasks onto the driver's node first)."""
    return ray.remote(num_cpus=num_cpus, scheduling_strategy="SPREAD")(fn)


def bounded_tasks(ray, task, jobs: dict, limit: int, timeout_s: float, fetch: bool = True):
    """Run ``task.remote(*args)`` for each ``key: args`` with at most ``limit`` in flight;
    yields (key, result) in completion order (the result's reference if not ``fetch``).
    Raises TimeoutError when no task finishes for ``timeout_s`` seconds (as Ray Data's
    no-progress timeout; a dead worker's task is retried by Ray meanwhile)."""
    queue, pending = collections.deque(jobs.items()), {}
    while queue or pending:
        while queue and len(pending) < limit:
            key, args = queue.popleft()
            pending[task.remote(*args)] = key
        ready, _ = ray.wait(list(pending), num_returns=1, fetch_local=fetch, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"no Ray task finished in {timeout_s} s ({len(pending)} running, {len(queue)} "
                               "queued); raise ray.no_progress_timeout_s if tasks are this slow")
        yield pending.pop(ready[0]), ray.get(ready[0]) if fetch else ready[0]


def release_freed_heap() -> None:
    """Hand freed memory back to the OS: Arrow's pool (mimalloc by default keeps ~100 MB of
    an image unit's pages) and the C heap (glibc's ``malloc_trim``; skipped elsewhere).

    A long-lived Ray worker that decodes, tokenizes and encodes unit after unit otherwise
    keeps what its allocators cached and fragmented: its resident memory creeps up with the
    number of units although it holds none of them, so its peak would grow with the corpus
    (RESULTS.md, growth). Dask's workers trim the same way. Call it between units, once the
    unit's objects are gone."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
