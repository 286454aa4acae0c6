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

    from pipelines.common.ray_session import RayConfig, ray_session

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


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory) -> str:
    """The project's sources copied once (a fresh git + DVC repo, no outputs) with the TINY
    params committed. Clone it for a fresh run: every copy of a session then runs the same
    code even while the working tree is being edited."""
    from tests.project import TINY, copy_project, git_commit, update_params

    root = copy_project(str(tmp_path_factory.mktemp("demo") / "template"))
    update_params(root, TINY)
    git_commit(root, "tiny params")
    return root


@pytest.fixture(scope="session")
def second_data_run(tiny_template, tmp_path_factory):
    """A second clean `dvc repro pack` (the data stages) in a fresh copy of the TINY demo, for
    the determinism test. `tiny_repro` starts it as soon as it is past the stages whose
    durations size the kill tests' random kill times (tests/reliability/test_stage_kills.py),
    so it overlaps the rest of that run instead of running alone; ``wait()`` starts it if
    nothing did."""
    from tests.project import BackgroundRepro, clone

    run = BackgroundRepro(clone(tiny_template, str(tmp_path_factory.mktemp("demo") / "second")), "pack")
    yield run
    run.stop()


def _second_data_run_starter(request):
    """`second_data_run`'s start if a selected test uses that fixture, else a no-op."""
    if not any("second_data_run" in item.fixturenames for item in request.session.items):
        return lambda: None
    return request.getfixturevalue("second_data_run").start


@pytest.fixture(scope="session")
def tiny_repro(request, tiny_template, tmp_path_factory):
    """One real `dvc repro` of every stage on the TINY demo, shared by the end-to-end and the
    reliability tests (each of its stages pays for Python imports and a Ray start-up, so it
    runs once a session). Read its outputs; clone the root to change anything."""
    from tests.project import DemoRun, clone, git_commit, read_lock, repro_timed

    _check_tiny_demo_group(request)
    root = clone(tiny_template, str(tmp_path_factory.mktemp("demo") / "run"))
    # tokenize: the first stage after those the kill tests time (test_stage_kills.OUT_DIR)
    durations = repro_timed(root, on_stage={"tokenize": _second_data_run_starter(request)})
    git_commit(root, "first run")
    print(f"tiny demo `dvc repro` stage times (s): {durations}")
    return DemoRun(root, durations, read_lock(root))


# The tests that read the session's tiny `dvc repro` (tiny_repro, second_data_run) run on one
# pytest-xdist worker, so that repro runs once; they go first because together they are the
# longest chain of the session, and the other workers take the rest meanwhile. tryfirst:
# xdist's own hook reads the xdist_group marks into the node ids.
TINY_DEMO_FIXTURES = ("tiny_repro", "second_data_run")


def _shares_tiny_demo(item) -> bool:
    return any(name in item.fixturenames for name in TINY_DEMO_FIXTURES)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _shares_tiny_demo(item):
            item.add_marker(pytest.mark.xdist_group("tiny_demo"))
    items.sort(key=lambda item: not _shares_tiny_demo(item))  # stable: each half keeps its order


def _check_tiny_demo_group(request) -> None:
    """Under pytest-xdist's loadgroup every tiny-demo test must carry the group in its node id,
    else xdist spreads them and each worker runs the tiny repro again (minutes of CI)."""
    if not getattr(request.config.option, "loadgroup", False):
        return
    stray = [item.nodeid for item in request.session.items
             if _shares_tiny_demo(item) and not item.nodeid.endswith("@tiny_demo")]
    if stray:
        pytest.fail(f"pytest-xdist did not group {stray} (pytest {pytest.__version__}): see pyproject's pytest pin")
