"""pretrain.loader_workers: the same steps from one thread or from loader processes, resume
mid-sequence, clean shutdown, and an unchanged loss curve."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from pipelines.common.configs import ParamsError, build
from pipelines.pretrain import RUNTIME_FIELDS, PretrainConfig
from pipelines.pretrain.loader import ProcessStepLoader, StepLoader, StepSource, step_loader
from tests.pipelines.pretrain_fixtures import (  # noqa: F401  (tiny_corpus is a fixture)
    tiny_corpus,
    tiny_job,
    tiny_pretrain_params,
    train_in_process,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/pipelines/conftest.py

STEPS = 6
BATCH = {"text": 4, "image": 2, "pair": 4}


def source_of(job: dict, rank: int = 0, world_size: int = 1) -> StepSource:
    """The StepSource a PretrainLoop of ``job`` builds (the task's own masker)."""
    from pipelines.common import task_files

    cfg = job["cfg"]
    masker = task_files.build_task(task_files.task_spec(cfg, job["text"], job["visual_vocab_size"])).masker
    return StepSource(job["index"], cfg.batch.as_dict(), cfg.seed, rank, world_size, masker,
                      job["text"]["pad_id"], log_samples=True)


def flat(value) -> list:
    """Every tensor / id / count of a step's data, in a fixed order (None kept)."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (int, str)):
        return [value]
    if dataclasses.is_dataclass(value):
        return [x for f in dataclasses.fields(value) for x in flat(getattr(value, f.name))]
    return [x for item in value for x in flat(item)]


def assert_same_step(a, b) -> None:
    xs, ys = flat(a), flat(b)
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


def load(loader, steps, last: int) -> list:
    try:
        return [loader.get(s, last) for s in steps]
    finally:
        loader.close()


@pytest.fixture(scope="module")
def job(tiny_corpus, tmp_path_factory):
    return tiny_job(tiny_corpus, str(tmp_path_factory.mktemp("loader")), batch=BATCH)


@pytest.fixture(scope="module")
def reference(job) -> list:
    """The first STEPS steps from the one-thread loader."""
    return load(step_loader(source_of(job), 1), range(STEPS), STEPS)


def test_one_thread_for_one_worker_processes_beyond(job):
    assert isinstance(step_loader(source_of(job), 1), StepLoader)
    assert isinstance(step_loader(source_of(job), 2), ProcessStepLoader)
    with pytest.raises(ValueError, match=">= 1"):
        step_loader(source_of(job), 0)


def test_two_processes_give_the_steps_of_one_thread_and_resume_mid_sequence(job, reference):
    """Batches (every tensor), masks, ids and token counts equal whatever loader_workers is;
    a loader started at step t (a resume) gives the t-th step of a fresh one."""
    assert all(step[2] for step in reference) and reference[0][2] != reference[1][2]
    for got, want in zip(load(step_loader(source_of(job), 2), range(STEPS), STEPS), reference):
        assert_same_step(got, want)
    t = 3
    for got, want in zip(load(step_loader(source_of(job), 2), range(t, STEPS), STEPS), reference[t:]):
        assert_same_step(got, want)
    for got, want in zip(load(step_loader(source_of(job), 1), range(t, STEPS), STEPS), reference[t:]):
        assert_same_step(got, want)


def test_out_of_order_step_restarts_the_processes_sampler(job, reference):
    loader = step_loader(source_of(job), 2)
    got = load(loader, [0, 1, 4, 5, 2], STEPS)
    for step, data in zip([0, 1, 4, 5, 2], got):
        assert_same_step(data, reference[step])


def test_close_stops_the_loader_processes(job):
    loader = step_loader(source_of(job), 2)
    loader.get(0, STEPS)
    pids = loader.worker_pids()
    assert len(pids) == 2 and all(alive(p) for p in pids)
    loader.close()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    loader.close()  # a second close is harmless


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_loader_workers_is_checked_and_runtime_only(tmp_path):
    assert "loader_workers" in RUNTIME_FIELDS  # a run may resume under another value
    with pytest.raises(ParamsError, match="loader_workers"):
        build(PretrainConfig, tiny_pretrain_params(str(tmp_path), loader_workers=0), "pretrain")


def test_loss_curve_is_the_same_with_two_loader_processes(tiny_corpus, tmp_path):
    curves = []
    for workers in (1, 2):
        root = str(tmp_path / f"w{workers}")
        job = tiny_job(tiny_corpus, root, steps=4, checkpoint_every=4, loader_workers=workers, log_samples=True)
        loop, _ = train_in_process(job)
        curves.append(([[r[k] for k in ("step", "loss", "grad_norm")] for r in loop.history], loop.samples))
    assert curves[0] == curves[1]
