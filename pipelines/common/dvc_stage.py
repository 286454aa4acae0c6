"""The dvc.yaml stage a process runs as, seen through DVC's own API.

`dvc repro` runs each stage's command with DVC_ROOT (the repository) and DVC_STAGE
(the stage's name) set; outside DVC both are absent and there is nothing to check.
"""
from __future__ import annotations

import os
import re

DVC_FILE = "dvc.yaml"


def running_stage() -> str | None:
    """The dvc.yaml stage this process runs as, or None outside `dvc repro`."""
    return os.environ.get("DVC_STAGE") if os.environ.get("DVC_ROOT") else None


def declared_deps(stage: str) -> list[str]:
    """Absolute paths of the stage's deps, templating resolved by DVC itself."""
    from dvc.repo import Repo

    with Repo(os.environ["DVC_ROOT"]) as repo:
        (found,) = repo.stage.collect(stage)
        return [os.path.abspath(str(dep.fs_path)) for dep in found.deps]


def deps_line(stage: str) -> int | None:
    """The line of ``deps:`` under the stage in dvc.yaml (1-based), for error messages."""
    path = os.path.join(os.environ.get("DVC_ROOT", "."), DVC_FILE)
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return None
    in_stage = False
    for number, line in enumerate(lines, 1):
        if re.match(rf"^\s{{2}}{re.escape(stage)}:\s*$", line):
            in_stage = True
        elif in_stage and re.match(r"^\s{2}\S", line):
            return None
        elif in_stage and re.match(r"^\s+deps:\s*$", line):
            return number
    return None


def undeclared(paths: dict[str, str], deps: list[str]) -> dict[str, str]:
    """The entries of ``paths`` (params key -> local path) under none of ``deps``."""
    def covered(path: str) -> bool:
        path = os.path.abspath(path)
        return any(path == dep or path.startswith(dep.rstrip(os.sep) + os.sep) for dep in deps)
    return {key: path for key, path in paths.items() if not covered(path)}
