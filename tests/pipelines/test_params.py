"""params.yaml is validated once, before any work, naming the bad key."""
import copy
import os
import subprocess
import sys

import pytest
import yaml

from pipelines.common.configs import ParamsError, build
from pipelines.params import Params, load_params
from tests.project import PROJECT_ROOT


@pytest.fixture(scope="module")
def raw_params():
    with open(os.path.join(PROJECT_ROOT, "params.yaml")) as f:
        return yaml.safe_load(f)


def test_repo_params_are_valid():
    params = load_params(os.path.join(PROJECT_ROOT, "params.yaml"))
    assert params.sources and params.ray.cpus_per_task > 0


@pytest.mark.parametrize("section,key,value,message", [
    ("pack", "shard_rowz", 5, r"pack\.shard_rowz: unknown key"),
    ("pack", "shard_rows", "many", r"pack\.shard_rows: expected an integer"),
    ("ray", "cpus_per_task", 0, r"ray\.cpus_per_task"),
    ("ray", "address", 12, r"ray\.address"),
])
def test_bad_values_name_the_key(raw_params, section, key, value, message):
    data = copy.deepcopy(raw_params)
    data[section][key] = value
    with pytest.raises(ParamsError, match=message):
        build(Params, data)


def test_missing_section_is_named(raw_params):
    data = copy.deepcopy(raw_params)
    del data["pack"]
    with pytest.raises(ParamsError, match=r"params\.pack: missing required key"):
        build(Params, data)


def test_bad_source_format_is_named(raw_params):
    data = copy.deepcopy(raw_params)
    data["sources"][0]["format"] = "csv"
    with pytest.raises(ParamsError, match="format: 'csv' is not a"):
        build(Params, data)


def test_stage_fails_before_work_on_bad_params(tmp_path, raw_params):
    data = copy.deepcopy(raw_params)
    data["clean"]["no_such_threshold"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
    proc = subprocess.run([sys.executable, "-m", "stages.clean"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "clean.no_such_threshold: unknown key" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]  # nothing was written


@pytest.fixture
def as_dvc_stage(monkeypatch):
    """Run as `dvc repro` runs a stage of this repository: DVC_ROOT and DVC_STAGE set."""
    def enter(stage: str) -> None:
        monkeypatch.setenv("DVC_ROOT", PROJECT_ROOT)
        monkeypatch.setenv("DVC_STAGE", stage)
    return enter


def write_params(tmp_path, data: dict) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_an_input_missing_from_dvc_yaml_fails_naming_key_and_line(raw_params, tmp_path, as_dvc_stage):
    data = copy.deepcopy(raw_params)
    data["sources"].append({"name": "mine", "kind": "text", "format": "txt", "path": "corpora/mine"})
    data["visual_tokenizer"]["pretrained"] = "weights/vqkd.pth"
    as_dvc_stage("clean")
    with pytest.raises(ParamsError, match=r"sources\[3\]\.path = 'corpora/mine'.*stage clean.*"
                                          r"`- corpora/mine` under stages\.clean\.deps \(dvc\.yaml line \d+\)"):
        load_params(write_params(tmp_path, data), stage="clean")
    as_dvc_stage("visual_tokenizer")
    with pytest.raises(ParamsError, match=r"visual_tokenizer\.pretrained = 'weights/vqkd\.pth'"):
        load_params(write_params(tmp_path, data), stage="visual_tokenizer")
    # stages that do not read those paths, and runs outside DVC, are not concerned
    as_dvc_stage("pack")
    load_params(write_params(tmp_path, data), stage="pack")


def test_every_demo_input_is_a_declared_dep(raw_params, as_dvc_stage):
    """The repository's own params.yaml passes the check of every stage that reads inputs."""
    for stage in ("clean", "text_tokenizer", "visual_tokenizer", "evaluate"):
        as_dvc_stage(stage)
        load_params(os.path.join(PROJECT_ROOT, "params.yaml"), stage=stage)


def test_uris_are_left_to_the_object_store(raw_params, tmp_path, as_dvc_stage):
    data = copy.deepcopy(raw_params)
    data["sources"].append({"name": "s3", "kind": "text", "format": "txt", "path": "s3://bucket/corpus"})
    as_dvc_stage("clean")
    load_params(write_params(tmp_path, data), stage="clean")
