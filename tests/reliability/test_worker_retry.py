"""A Ray worker SIGKILLed in the middle of a task is retried; the stage output is unchanged.

clean runs its per-unit map as Ray tasks (retried on worker death: Ray's default
max_retries); tokenize runs an actor pool (Ray Data gives its actors max_restarts=-1 and
max_task_retries=-1 unless a stage overrides them). Each test runs the stage as
`python -m stages.<name>` in a project copy, watches the stage's processes for a worker
whose title (Ray sets ``ray::<task>`` while a task runs) shows it executing the map, kills
it with SIGKILL, and compares the finished output with the uninterrupted reference run.
"""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.project import files_under
from tests.reliability.conftest import project_with_inputs
from tests.reliability.processes import kill, log_tail, start_stage

pytestmark = pytest.mark.slow


def run_killing_one_worker(project: str, stage: str, task: str, log: str, timeout: float = 900) -> dict:
    """Run the stage; SIGKILL the first of its Ray workers whose title (``ray::...``) names
    ``task``; return what was killed and the exit code."""
    proc = start_stage(project, stage, log)
    driver, killed, deadline = psutil.Process(proc.pid), None, time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if killed is None:
                killed = _kill_running(driver, task)
            time.sleep(0.01)
        assert proc.poll() is not None, f"{stage} did not finish in {timeout}s\n{log_tail(log)}"
    finally:
        if proc.poll() is None:
            kill(proc, signal.SIGKILL)
    return {"killed": killed, "returncode": proc.returncode}


def _kill_running(driver: psutil.Process, task: str) -> dict | None:
    try:
        workers = driver.children(recursive=True)
    except psutil.Error:
        return None
    for worker in workers:
        try:
            title = " ".join(worker.cmdline())  # read just before the kill
            if title.startswith("ray::") and task in title:
                worker.kill()
                return {"pid": worker.pid, "title": title.strip()}
        except psutil.Error:
            continue
    return None


def reader_visible(root: str) -> dict[str, bytes]:
    """What a reader of the output sees: everything but temp files of interrupted writes."""
    return {rel: data for rel, data in files_under(root).items() if ".tmp-" not in rel}


@pytest.mark.parametrize("stage, inputs, out, task", [
    ("clean", ["data/demo"], "data/clean", "ray::map_units"),
    # an actor's title gains ".submit" while it runs a task (plain while idle or in __init__)
    ("tokenize", ["data/clean", "data/text_tokenizer", "data/visual_tokenizer"], "data/tokenized",
     "MapBatches(PartTokenizer)).submit"),
], ids=["clean-task", "tokenize-actor"])
def test_worker_killed_mid_task_is_retried_with_same_output(tiny_template, tiny_repro, tmp_path, stage, inputs,
                                                            out, task):
    project = project_with_inputs(tiny_template, tiny_repro.root, str(tmp_path / "project"), inputs)
    log = str(tmp_path / "stage.log")
    result = run_killing_one_worker(project, stage, task, log)
    assert result["killed"], f"no worker was seen running {task!r}; nothing was killed\n{log_tail(log)}"
    assert result["returncode"] == 0, f"{stage} failed after its worker was killed\n{log_tail(log)}"
    print(f"{stage}: killed {result['killed']}")
    assert reader_visible(os.path.join(project, out)) == reader_visible(os.path.join(tiny_repro.root, out))
