"""Stage outputs on object storage, versioned through a small local manifest.

DVC 3 does not cache external outputs, so a stage that writes its data to
object storage (``remote_dir: s3://bucket/run/shards``, see :class:`StageOutput`)
cannot hand its files to DVC. Instead the stage's DVC-tracked output (its local
``out_dir``) holds one file, ``remote.json``:

    {"out_dir": "s3://bucket/run/shards",        (the remote_dir)
     "store":   "s3://bucket/run/.cas",
     "files":   [{"path": "train/shard-00000.parquet", "bytes": 123,
                  "sha256": "ab12...", "uri": "s3://bucket/run/.cas/sha256/ab/ab12....parquet"}],
     "count": 1, "bytes": 123}

Every file is copied (server side) to a content-addressed URI in ``store``, a
sibling of the remote_dir that no stage ever clears; a rerun of the stage may
overwrite ``remote_dir``, but the objects a committed manifest names stay put, so
every past version stays readable (:func:`restore_output` copies a manifest's
objects back to the remote_dir). The manifest is deterministic (sorted, no
timestamps): the same files give the same bytes, a changed file changes it,
so DVC reruns exactly the downstream stages that read changed data, and
``dvc push`` versions the manifest like any other artifact.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

from pipelines.common import storage
from pipelines.common.configs import to_dict

MANIFEST = "remote.json"
STORE = ".cas"


@dataclass(frozen=True)
class StageOutput:
    """Where a data stage writes. ``out_dir``: the stage's DVC out, a local folder (dvc.yaml
    takes it from params.yaml). ``remote_dir``: null, or an object-storage URI that receives
    the data instead; ``out_dir`` then holds only remote.json, the manifest DVC versions."""

    out_dir: str = field(kw_only=True)
    remote_dir: str | None = field(default=None, kw_only=True)

    def __post_init__(self):
        # ValueError: the params builder adds the section's name
        if not self.out_dir or storage.is_uri(self.out_dir):
            raise ValueError(f"out_dir {self.out_dir!r}: must be a local folder (DVC tracks it); "
                             "put an object-storage URI in remote_dir")
        if self.remote_dir is not None and not storage.is_uri(self.remote_dir):
            raise ValueError(f"remote_dir {self.remote_dir!r}: must be an object-storage URI (s3://...) or null")

    @property
    def data_dir(self) -> str:
        """Where the stage's files are: remote_dir if set, else out_dir."""
        return self.remote_dir or self.out_dir

    def content_params(self) -> dict:
        """The config without its locations: what output fingerprints hash, so the same data
        written elsewhere keeps its fingerprint."""
        params = to_dict(self) | {"out_dir": None}
        del params["remote_dir"]
        return params


def track_output(out_dir: str, tracked_dir: str) -> dict:
    """After a stage wrote ``out_dir``: if it is a URI, pin its files in ``tracked_dir/remote.json``
    and return ``{"remote_output": summary}`` to merge into the stage metrics; a local
    ``out_dir`` is tracked by DVC itself ({})."""
    if not storage.is_uri(out_dir):
        return {}
    manifest = build_manifest(out_dir)
    _replace_dir_with_manifest(tracked_dir, manifest)
    return {"remote_output": {"manifest": os.path.join(tracked_dir, MANIFEST), "files": manifest["count"],
                              "bytes": manifest["bytes"], "store": manifest["store"]}}


def store_for(out_dir: str) -> str:
    """The content-addressed store of ``out_dir``: ``.cas`` beside it (shared by sibling outputs)."""
    out_dir = str(out_dir).rstrip("/")
    if storage.is_uri(out_dir) and "/" not in out_dir.partition("://")[2]:
        raise ValueError(f"{out_dir}: give a stage output a prefix inside the bucket (e.g. {out_dir}/run/shards), "
                         "not the bucket root: its content-addressed store sits beside it, where a rerun "
                         "that clears the output cannot reach")
    return storage.join(posixpath.dirname(out_dir), STORE)


def content_uri(store: str, sha256: str, rel_path: str) -> str:
    """Where the object with this sha256 lives (the file's extension kept for humans and tools)."""
    ext = posixpath.splitext(rel_path)[1]
    return storage.join(store, "sha256", sha256[:2], sha256 + ext)


def build_manifest(out_dir: str, store: str | None = None) -> dict:
    """Hash every file under ``out_dir``, copy it to its content address (unless already there)."""
    store = store or store_for(out_dir)
    base = str(out_dir).rstrip("/")
    files = []
    for path in storage.list_files(base):
        rel = path[len(base) + 1:]
        digest = storage.sha256_file(path)
        uri = content_uri(store, digest, rel)
        if not storage.exists(uri):
            _copy(path, uri)
        fs, p = storage.filesystem(path)
        files.append({"path": rel, "bytes": fs.get_file_info(p).size, "sha256": digest, "uri": uri})
    if not files:
        raise FileNotFoundError(f"{out_dir}: the stage wrote no files there; nothing to track")
    return {"out_dir": base, "store": store, "files": files,
            "count": len(files), "bytes": sum(f["bytes"] for f in files)}


def read_manifest(tracked_dir: str) -> dict:
    return storage.read_json(os.path.join(tracked_dir, MANIFEST))


def verify_output(tracked_dir: str) -> list[str]:
    """Paths whose file in ``out_dir`` no longer matches the manifest (missing or changed)."""
    manifest = read_manifest(tracked_dir)
    stale = []
    for entry in manifest["files"]:
        path = storage.join(manifest["out_dir"], entry["path"])
        if not storage.exists(path) or storage.sha256_file(path) != entry["sha256"]:
            stale.append(entry["path"])
    return stale


def restore_output(tracked_dir: str) -> int:
    """Make ``out_dir`` match the manifest again (e.g. after ``git checkout`` + ``dvc checkout``
    of an older run): copy back each changed file from its content address, checking its
    sha256. Files the manifest does not name are left alone. Returns how many were copied."""
    manifest = read_manifest(tracked_dir)
    stale = set(verify_output(tracked_dir))
    for entry in manifest["files"]:
        if entry["path"] not in stale:
            continue
        if storage.sha256_file(entry["uri"]) != entry["sha256"]:
            raise ValueError(f"{entry['uri']}: content does not match its sha256 {entry['sha256']}")
        _copy(entry["uri"], storage.join(manifest["out_dir"], entry["path"]))
    return len(stale)


def _copy(src: str, dst: str) -> None:
    """Server-side copy within one object store; through memory across file systems."""
    src_fs, src_p = storage.filesystem(src)
    dst_fs, dst_p = storage.filesystem(dst)
    if storage.is_uri(src) and src.split("://")[0] == dst.split("://")[0]:
        dst_fs.create_dir(posixpath.dirname(dst_p), recursive=True)
        src_fs.copy_file(src_p, dst_p)  # S3: one CopyObject, the bytes never leave the store
        return
    storage.write_bytes(dst, storage.read_bytes(src))


def _replace_dir_with_manifest(tracked_dir: str, manifest: dict) -> None:
    """``tracked_dir`` becomes a folder holding only the manifest (local files of an earlier
    run with a local out_dir are DVC-cached already), swapped in by renames."""
    if storage.is_uri(tracked_dir):
        raise ValueError(f"{tracked_dir}: the DVC-tracked output must be a local folder")
    staging = storage.staging_dir(tracked_dir)
    storage.write_json(os.path.join(staging, MANIFEST), manifest)
    storage.publish_dir(staging, tracked_dir)


__all__ = ["MANIFEST", "track_output", "build_manifest", "store_for", "content_uri",
           "read_manifest", "verify_output", "restore_output"]
