"""Run the real pipeline in a throw-away copy of the project (a fresh git + DVC repo)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import yaml

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
