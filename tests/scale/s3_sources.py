"""Point a project copy's sources (and chosen stage outputs) at the loopback S3 server."""
from __future__ import annotations

import os

import yaml

from pipelines.common import storage
from tests.project import run, update_params

# (source name, kind, format, folder under data/demo)
SOURCES = (("demo_text", "text", "jsonl", "text"), ("demo_images", "image", "folder", "images"),
           ("demo_pairs", "pair", "webdataset", "pairs"))


def upload(local_dir: str, uri: str) -> int:
    files = storage.list_files(local_dir)
    for path in files:
        storage.write_bytes(storage.join(uri, os.path.relpath(path, local_dir)), storage.read_bytes(path))
    return len(files)


def use_s3_sources(project: str, prefix: str, params: dict) -> None:
    """Make the demo corpus here, upload it under ``prefix/sources``, and make the copy read it
    from there: params ``sources`` (merged with ``params``) and the clean stage's DVC
    dependency (the s3:// sources themselves, in place of the demo folders)."""
    update_params(project, {**params, "sources": [{"name": n, "kind": k, "format": f, "path": f"{prefix}/sources/{d}"}
                                                  for n, k, f, d in SOURCES]})
    run(project, "dvc", "repro", "demo_data")
    for *_, folder in SOURCES:
        assert upload(os.path.join(project, "data/demo", folder), f"{prefix}/sources/{folder}") > 0
    with open(os.path.join(project, "dvc.yaml")) as f:
        dvc = yaml.safe_load(f)
    deps = dvc["stages"]["clean"]["deps"]
    dvc["stages"]["clean"]["deps"] = [d for d in deps if not d.startswith("data/demo/")] + [f"{prefix}/sources"]
    with open(os.path.join(project, "dvc.yaml"), "w") as f:
        yaml.safe_dump(dvc, f, sort_keys=False)
