"""The one place that connects to Ray.

``ray.address`` null starts a local instance sized to the machine; "auto" or
"host:port" joins an existing cluster (e.g. when the stage runs as a Ray Job).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from pipelines.configs import check


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    # Logical CPUs of a local instance. More than the physical cores on purpose:
    # on a 2-core machine two 1-CPU actors would starve Ray Data's read tasks.
    num_cpus: int | None = None
    # CPUs each map task / actor asks for; fractional so small machines never deadlock.
    cpus_per_task: float = 0.5
    # Seconds Ray Data may make no progress before it fails (Ray's default is 30 min).
    no_progress_timeout_s: int = 600

    def __post_init__(self):
        check(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus: must be >= 1 or null")
        check(0 < self.cpus_per_task <= 64, "ray.cpus_per_task: must be in (0, 64]")
        check(self.no_progress_timeout_s > 0, "ray.no_progress_timeout_s: must be > 0")


def local_num_cpus(config: RayConfig) -> int:
    return config.num_cpus or max(4, 2 * (os.cpu_count() or 1))


@contextlib.contextmanager
def ray_session(config: RayConfig):
    """Connect (or start), yield the ``ray`` module, and shut down on exit."""
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", str(config.no_progress_timeout_s))
    if not sys.stderr.isatty():
        # Non-terminal logs (CI, dvc repro piped to a file) stay readable: no tqdm floods.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():  # the caller (a test, a Ray Job driver) already connected
        yield ray
        return
    project_root = os.getcwd()
    runtime_env = {"env_vars": {"PYTHONPATH": _pythonpath(project_root)}}
    if config.address is None:
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
        ray.init(address=config.address, runtime_env=runtime_env, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def _pythonpath(root: str) -> str:
    existing = os.environ.get("PYTHONPATH")
    return root if not existing else f"{root}{os.pathsep}{existing}"
