"""dvc.yaml cannot drift from the code: every project module a stage runs lies under one
of that stage's deps, every stage follows the one-name rule, and every output path is
written once (params.yaml) and reaches dvc.yaml only through templating."""
from __future__ import annotations

import ast
import os
import re
import subprocess
from functools import cache

import pytest
import yaml

from tests.project import PROJECT_ROOT

PROJECT_PACKAGES = ("model", "pipelines", "stages")
PARAMS_LOADER = "pipelines.params"  # imports every stage's config: its imports are not followed


def module_file(name: str) -> str | None:
    """The project file of a dotted module name (package -> its __init__.py), or None."""
    base = os.path.join(PROJECT_ROOT, *name.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def imported_modules(path: str, name: str) -> set[str]:
    """Project modules ``path`` imports anywhere (function-level imports included), with the
    packages whose __init__ runs on the way."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] not in PROJECT_PACKAGES:
                continue
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in found if module_file(m)}


@cache
def modules_run_by(stage: str) -> frozenset[str]:
    """Project modules reached from stages/<stage>.py, not through the params loader."""
    seen, todo = set(), [f"stages.{stage}"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != PARAMS_LOADER:
            todo.extend(imported_modules(module_file(name), name))
    return frozenset(seen)


def docstring_only(path: str) -> bool:
    """A module with nothing but a docstring runs no code a stage's output could depend on."""
    body = ast.parse(open(path, encoding="utf-8").read()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


@cache
def resolved_stages() -> dict[str, dict]:
    """dvc.yaml's stages with DVC's own templating resolved against params.yaml."""
    from dvc.repo import Repo

    with Repo(PROJECT_ROOT) as repo:
        return {s.name: {"deps": [os.path.relpath(str(d.fs_path), PROJECT_ROOT) for d in s.deps],
                         "outs": [os.path.relpath(str(o.fs_path), PROJECT_ROOT) for o in s.outs if not o.metric],
                         "params": sorted(k for p in s.params for k in p.params)}
                for s in repo.index.stages}


def raw_dvc_yaml() -> dict:
    return yaml.safe_load(open(os.path.join(PROJECT_ROOT, "dvc.yaml"), encoding="utf-8"))["stages"]


STAGES = sorted(raw_dvc_yaml())


def under(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_every_module_a_stage_runs_is_among_its_deps(stage):
    deps = resolved_stages()[stage]["deps"]
    missing = []
    for name in sorted(modules_run_by(stage)):
        path = os.path.relpath(module_file(name), PROJECT_ROOT)
        if not under(path, deps) and not docstring_only(module_file(name)):
            missing.append(f"{name} ({path})")
    assert not missing, (f"stage {stage} runs {', '.join(missing)}, which lie under none of its deps in "
                         f"dvc.yaml ({deps}): add the module's folder to stages.{stage}.deps")


@pytest.mark.parametrize("stage", STAGES)
def test_one_stage_one_name(stage):
    raw = raw_dvc_yaml()[stage]
    assert raw["cmd"] == f"python -m stages.{stage}"
    assert os.path.isfile(os.path.join(PROJECT_ROOT, "stages", f"{stage}.py"))
    assert module_file(f"pipelines.{stage}"), f"no pipelines/{stage}.py or pipelines/{stage}/"
    assert stage in raw["params"], f"stages.{stage}.params must list its own section"
    metrics = [next(iter(m)) if isinstance(m, dict) else m for m in raw.get("metrics", [])]
    assert metrics == [f"metrics/{stage}.json"]


def test_no_stage_package_imports_another_stage():
    """What two stages share lives in pipelines/common; a stage package reaches no other's."""
    offenders = []
    for stage in STAGES:
        own = f"pipelines.{stage}"
        for name in modules_run_by(stage):
            if not name.startswith(("pipelines.", "stages.")) or name in (PARAMS_LOADER, "pipelines"):
                continue
            owner = ".".join(name.split(".")[:2])
            if name.startswith("pipelines.") and owner not in (own, "pipelines.common"):
                offenders.append(f"{stage} -> {name}")
    assert not offenders, offenders


def test_output_paths_are_written_once():
    """Each resolved out of dvc.yaml (metrics aside: metrics/<stage>.json is the naming
    rule) is spelled once in params.yaml, never in dvc.yaml itself nor in the code
    (dvc.yaml templates it; stages read it from params)."""
    params_text = open(os.path.join(PROJECT_ROOT, "params.yaml"), encoding="utf-8").read()
    outs = [o for s in resolved_stages().values() for o in s["outs"]]
    assert outs
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "dvc.yaml", "pipelines", "stages",
                              "model"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.split()
    for out in outs:
        as_value = re.findall(rf"(?m)^\s*[\w.]+:\s+{re.escape(out)}\s*(?:#.*)?$", params_text)
        assert len(as_value) == 1, f"{out}: expected once as a value in params.yaml, found {as_value}"
        for rel in tracked:
            text = open(os.path.join(PROJECT_ROOT, rel), encoding="utf-8").read()
            assert f"{out}\"" not in text and f"{out}'" not in text and f" {out}\n" not in text, \
                f"{out} is written in {rel}; take it from params.yaml"
