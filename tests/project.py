"""Run the real pipeline in a throw-away copy of the project (a fresh git + DVC repo)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DATA_STAGES = ["demo_data", "clean", "text_tokenizer", "visual_tokenizer", "tokenize", "pack"]
STAGES = [*DATA_STAGES, "pretrain", "evaluate", "report"]

# The demo shrunk for tests: seconds of work per stage (most of a stage's time is Python
# imports and Ray starting), yet every data stage writes several parts, so a kill can land
# between two of them, and the held-out splits are big enough for evaluate.
TINY = {
    "demo_data": {"num_pairs": 60, "pairs_per_tar": 30, "num_images": 20, "max_text_docs": 200,
                  "text_docs_per_file": 100, "num_retrieval_train": 60, "num_retrieval_test": 30,
                  "num_probe_train": 36, "num_probe_val": 18},
    "clean": {"part_rows": 50},
    "text_tokenizer": {"vocab_size": 300},
    "visual_tokenizer": {"steps": 20, "warmup_steps": 5, "batch_size": 16, "holdout": 10},
    "tokenize": {"batch_size": 2, "num_actors": 1},  # small batches: a part takes long enough to be hit
    "pack": {"shard_rows": 50},
    "pretrain": {"steps": 6, "batch": {"text": 4, "image": 4, "pair": 4}, "warmup_steps": 2,
                 "checkpoint_every": 3, "log_every": 1, "num_workers": 1},
    "evaluate": {"max_samples": 40,
                 "retrieval": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
                 "probe": {"steps": 10}},
}


def tracked_files(root: str = PROJECT_ROOT) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    return [p for p in out.splitlines() if p and os.path.exists(os.path.join(root, p))]


def copy_project(dest: str) -> str:
    """Copy the project's source files to ``dest`` and make it a git repo."""
    for rel in tracked_files():
        if rel.startswith(("data/", "models/", "metrics/", "plots/", "report/", "checkpoints/")):
            continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(PROJECT_ROOT, rel), target)
    env = project_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def project_env(extra: dict | None = None) -> dict:
    """Environment in which `python` and `dvc` are this venv's and the project imports."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


def update_params(project: str, overrides: dict) -> None:
    """Deep-merge ``overrides`` into the copy's params.yaml (keys must already exist)."""
    path = os.path.join(project, "params.yaml")
    with open(path) as f:
        params = yaml.safe_load(f)
    _merge(params, overrides, "params")
    with open(path, "w") as f:
        yaml.safe_dump(params, f, sort_keys=False)


def _merge(base: dict, over: dict, where: str) -> None:
    for key, value in over.items():
        if key not in base:
            raise KeyError(f"{where}.{key} is not in params.yaml")
        if isinstance(value, dict) and isinstance(base[key], dict):
            _merge(base[key], value, f"{where}.{key}")
        else:
            base[key] = value


def run(project: str, *args: str, env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run a command in the project copy; raise with its output if it fails."""
    proc = subprocess.run(
        list(args), cwd=project, env=project_env(env), capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode})\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def stages_run(output: str) -> list[str]:
    """Names of the stages `dvc repro` actually ran, from its output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def git_commit(project: str, message: str) -> None:
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message)


def clone(source: str, path: str) -> str:
    """A copy of a project copy as it stands (git repo, DVC cache and outputs included)."""
    shutil.copytree(source, path, symlinks=True)
    return path


def files_under(root) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones and temp files included) -> its bytes."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def read_lock(root: str) -> dict:
    with open(os.path.join(root, "dvc.lock")) as f:
        return yaml.safe_load(f)


def repro_timed(root: str, *targets: str, timeout: float = 1500,
                on_stage: dict[str, Callable[[], None]] | None = None) -> dict[str, float]:
    """`dvc repro [targets]` in ``root``; returns the stages it ran, in order, with each one's
    wall time (from when DVC announced it to when it announced the next one). ``on_stage``
    maps a stage name to a call made as soon as DVC announces that stage."""
    proc = subprocess.Popen(["dvc", "repro", *targets], cwd=root, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=project_env({"PYTHONUNBUFFERED": "1"}))
    starts, lines, deadline = [], [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Running stage '"):
            stage = line.split("'")[1]
            starts.append((stage, time.time()))
            if on_stage and stage in on_stage:
                on_stage[stage]()
        if time.time() > deadline:
            proc.kill()
            break
    rc = proc.wait()
    assert rc == 0, f"dvc repro {' '.join(targets)} failed ({rc}):\n{''.join(lines)[-6000:]}"
    ends = [t for _, t in starts[1:]] + [time.time()]
    return {name: round(end - start, 1) for (name, start), end in zip(starts, ends)}


class BackgroundRepro:
    """`dvc repro [targets]` in ``root``, started on demand without waiting for it, in a
    session of its own (so it can be ended with every Ray process its stages started)."""

    def __init__(self, root: str, *targets: str):
        self.root, self.targets, self.proc = root, targets, None
        self.log = root + ".repro.log"  # beside the project: the run's output is no part of it

    def start(self) -> None:
        if self.proc is None:
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen(["dvc", "repro", *self.targets], cwd=self.root, env=project_env(),
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 1500) -> list[str]:
        """Start it unless started, wait for it; returns the stages it ran (fails if it failed)."""
        self.start()
        rc = self.proc.wait(timeout=timeout)
        with open(self.log) as f:
            output = f.read()
        assert rc == 0, f"dvc repro {' '.join(self.targets)} failed ({rc}):\n{output[-6000:]}"
        return stages_run(output)

    def stop(self) -> None:
        """End it if it still runs (a session that never waited for it)."""
        if self.proc is not None and self.proc.poll() is None:
            from tests.reliability.processes import kill  # it imports this module

            kill(self.proc, signal.SIGKILL)


@dataclass(frozen=True)
class DemoRun:
    """One uninterrupted `dvc repro` of the whole pipeline on the TINY demo, committed to git."""
    root: str                    # the project copy holding its outputs (read them; clone to change)
    durations: dict[str, float]  # stage -> seconds, in the order the stages ran
    lock: dict                   # its dvc.lock
