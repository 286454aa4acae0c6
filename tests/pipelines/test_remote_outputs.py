"""pipelines.common.remote_outputs: content-addressed manifests of stage outputs on object storage."""
import json
import os
import uuid

import pytest

from pipelines.common import remote_outputs, storage


def _write_output(base: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        storage.write_bytes(storage.join(base, rel), data)


def test_local_out_dir_is_left_to_dvc(tmp_path):
    assert remote_outputs.track_output(str(tmp_path / "out"), str(tmp_path / "tracked")) == {}
    assert not (tmp_path / "tracked").exists()


def test_store_sits_beside_out_dir():
    assert remote_outputs.store_for("s3://b/run/shards") == "s3://b/run/.cas"
    assert remote_outputs.store_for("s3://b/run/shards/") == "s3://b/run/.cas"
    with pytest.raises(ValueError, match="bucket root"):
        remote_outputs.store_for("s3://b")


def test_manifest_is_content_addressed_and_restorable(tmp_path):
    out = str(tmp_path / "out")
    _write_output(out, {"train/shard-00000.parquet": b"a" * 10, "manifest.json": b"{}"})
    first = remote_outputs.build_manifest(out)
    assert [f["path"] for f in first["files"]] == ["manifest.json", "train/shard-00000.parquet"]
    entry = first["files"][1]
    assert entry["sha256"] == storage.sha256(b"a" * 10) and entry["bytes"] == 10
    assert entry["uri"].endswith(f"/.cas/sha256/{entry['sha256'][:2]}/{entry['sha256']}.parquet")
    assert storage.read_bytes(entry["uri"]) == b"a" * 10
    assert remote_outputs.build_manifest(out) == first  # deterministic

    # a rerun overwrites a shard: the manifest changes, the old object stays
    _write_output(out, {"train/shard-00000.parquet": b"b" * 10})
    second = remote_outputs.build_manifest(out)
    assert second != first and second["files"][1]["sha256"] == storage.sha256(b"b" * 10)
    assert storage.read_bytes(entry["uri"]) == b"a" * 10

    # checking out the old manifest and restoring brings the old shard back
    tracked = tmp_path / "tracked"
    tracked.mkdir()
    (tracked / remote_outputs.MANIFEST).write_text(json.dumps(first))
    assert remote_outputs.verify_output(str(tracked)) == ["train/shard-00000.parquet"]
    assert remote_outputs.restore_output(str(tracked)) == 1
    assert storage.read_bytes(storage.join(out, "train/shard-00000.parquet")) == b"a" * 10
    assert remote_outputs.verify_output(str(tracked)) == []


def test_empty_output_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote no files"):
        remote_outputs.build_manifest(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_s3_output_becomes_a_local_manifest(s3_env, tmp_path):
    out = f"s3://beit3/remote-outputs-{uuid.uuid4().hex[:8]}/shards"
    _write_output(out, {"train/shard-00000.parquet": b"x" * 100, "val/shard-00000.parquet": b"y" * 5})
    tracked = tmp_path / "data" / "shards"
    tracked.mkdir(parents=True)
    (tracked / "stale-local-shard.parquet").write_bytes(b"old local run")
    summary = remote_outputs.track_output(out, str(tracked))["remote_output"]
    assert summary["files"] == 2 and summary["bytes"] == 105
    assert os.listdir(tracked) == [remote_outputs.MANIFEST]  # only the manifest is left for DVC
    manifest = remote_outputs.read_manifest(str(tracked))
    for entry in manifest["files"]:
        assert entry["uri"].startswith(out.rsplit("/", 1)[0] + "/.cas/sha256/")
        assert storage.sha256_file(entry["uri"]) == entry["sha256"]
    # the content-addressed copies survive a stage clearing its out_dir
    fs, p = storage.filesystem(out)
    fs.delete_dir_contents(p)
    assert sorted(remote_outputs.verify_output(str(tracked))) == ["train/shard-00000.parquet", "val/shard-00000.parquet"]
    assert remote_outputs.restore_output(str(tracked)) == 2
    assert remote_outputs.verify_output(str(tracked)) == []


def test_tracked_dir_is_swapped_for_the_manifest_alone(tmp_path):
    """The DVC output folder of an earlier local run becomes a folder holding only remote.json,
    by renames (storage.staging_dir / publish_dir): no staging or old folder is left behind."""
    tracked = tmp_path / "data" / "shards"
    (tracked / "train").mkdir(parents=True)
    (tracked / "train" / "shard-00000.parquet").write_bytes(b"old local run")
    manifest = {"out_dir": "s3://b/run/shards", "store": "s3://b/run/.cas", "files": [], "count": 0, "bytes": 0}
    remote_outputs._replace_dir_with_manifest(str(tracked), manifest)
    assert os.listdir(tracked) == [remote_outputs.MANIFEST]
    assert remote_outputs.read_manifest(str(tracked)) == manifest
    assert os.listdir(tmp_path / "data") == ["shards"]
    with pytest.raises(ValueError, match="local folder"):
        remote_outputs._replace_dir_with_manifest("s3://b/run/tracked", manifest)
