"""pipelines.common.ray_session: where the stages' Ray work runs, and how its progress reads in logs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from pipelines.common.configs import ParamsError
from pipelines.common.ray_session import RayConfig, bounded_tasks, cluster_address, spread_task

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_address_comes_from_params_then_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(RayConfig()) is None  # start a local instance
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # inside a Ray Job
    assert cluster_address(RayConfig()) == "10.0.0.5:6379"
    assert cluster_address(RayConfig(address="auto")) == "auto"  # params win
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")  # the Jobs CLI's address, not a cluster
    with pytest.raises(ValueError, match="Jobs API"):
        cluster_address(RayConfig())


def test_progress_interval_is_checked():
    with pytest.raises(ParamsError, match="progress_log_s"):
        RayConfig(progress_log_s=0)


def _driver(body: str) -> str:
    return textwrap.dedent("""
        import json, os, sys, time
        from pipelines.common.ray_session import RayConfig, ray_session
    """) + textwrap.dedent(body)


def _run_driver(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """A driver in its own process; stdout and stderr are pipes, i.e. not terminals."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_DATA_") and k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**base, "PYTHONPATH": PROJECT_ROOT, "RAY_USAGE_STATS_ENABLED": "0",
                                                **env})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_non_terminal_logs_get_a_few_periodic_progress_blocks_and_no_bars():
    # a few seconds of work (8 blocks of 0.4 s on 2 CPUs) logged every second.
    code = _driver("""
        def slow(batch):
            time.sleep(0.4)
            return batch
        with ray_session(RayConfig(num_cpus=2, progress_log_s=1)) as ray:
            start = time.perf_counter()
            rows = ray.data.range(80, override_num_blocks=8).map_batches(slow, batch_size=None).count()
            print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}))
    """)
    proc = _run_driver(code, {})
    result = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert result["rows"] == 80
    log = proc.stdout + proc.stderr
    blocks = re.findall(r"=+ Running Dataset: \S+ =+", log)
    # periodic: more than the first block; few: about one per second of execution, not one per task
    assert 2 <= len(blocks) <= result["seconds"] / 1 + 2, (len(blocks), result["seconds"], log[-3000:])
    progress = re.findall(r"MapBatches\(slow\)\S*: (\d+)/(\d+)", log)
    assert progress and int(progress[-1][0]) > 0, log[-3000:]  # rows done per operator, readable
    assert "\r" not in log and "it/s" not in log and "%|" not in log  # no tqdm bars


@pytest.mark.slow
def test_ray_address_in_the_environment_joins_that_cluster(tmp_path):
    """`ray.address: null` with RAY_ADDRESS set (as in a Ray Job's driver) joins that cluster
    instead of failing to start a local one."""
    from tests.scale.ray_cluster import ray_head

    code = _driver("""
        with ray_session(RayConfig()) as ray:  # ray.address: null
            ctx = ray.get_runtime_context()
            print(json.dumps({"gcs": ctx.gcs_address, "cpus": ray.cluster_resources().get("CPU")}))
    """)
    with ray_head(num_cpus=3) as head:
        start = time.perf_counter()
        proc = _run_driver(code, {**head.env, "RAY_ADDRESS": head.address})
        joined = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
        print(f"\njoined in {time.perf_counter() - start:.1f}s: {joined}")
    assert joined["gcs"] == head.address and joined["cpus"] == 3  # the head's 3 CPUs, not a local 4+


def _sleep_then_return(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def test_bounded_tasks_keep_the_limit_and_fail_when_nothing_finishes(ray_local):
    task = spread_task(ray_local, _sleep_then_return, num_cpus=0.5)
    jobs = {k: (0.2 * (3 - k), k * 10) for k in range(3)}
    assert dict(bounded_tasks(ray_local, task, jobs, limit=2, timeout_s=60)) == {0: 0, 1: 10, 2: 20}
    with pytest.raises(TimeoutError, match="no_progress_timeout_s"):
        list(bounded_tasks(ray_local, task, {"slow": (3, 1)}, limit=1, timeout_s=0.5))
