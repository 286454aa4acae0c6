"""Shared fixtures: a real local Ray instance, tiny corpora, a temp project copy."""
from __future__ import annotations

import os

import pytest

# Fail fast instead of Ray Data's 30-minute stall detector; quiet, readable logs.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole test session (4 logical CPUs)."""
    import ray

    from pipelines.ray_session import RayConfig, ray_session

    if ray.is_initialized():
        yield ray
        return
    with ray_session(RayConfig(num_cpus=4)) as r:
        yield r


@pytest.fixture(scope="session")
def s3_env():
    """A real S3-compatible server on loopback; sets the AWS_* variables while it runs."""
    from tests.s3_server import s3_server

    with s3_server(bucket="beit3") as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
