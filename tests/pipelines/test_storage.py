"""pipelines.common.storage against the local disk and a real S3-compatible server."""
import os

import pyarrow as pa
import pytest

from pipelines.common import storage


def _roundtrip(base: str):
    table = pa.table({"id": ["b", "a"], "x": [1, 2]})
    data = storage.write_parquet(table, storage.join(base, "t", "part-00000.parquet"))
    storage.write_json(storage.join(base, "t", "manifest.json"), {"sha": storage.sha256(data)})
    files = storage.list_files(storage.join(base, "t"), ".parquet")
    assert files == [storage.join(base, "t", "part-00000.parquet")]
    assert storage.read_parquet(files[0]).equals(table)
    assert storage.read_json(storage.join(base, "t", "manifest.json"))["sha"] == storage.sha256_file(files[0])
    assert storage.exists(files[0]) and not storage.exists(storage.join(base, "nope"))


def test_local_roundtrip_and_atomic_names(tmp_path):
    _roundtrip(str(tmp_path))
    leftovers = [n for n in os.listdir(tmp_path / "t") if ".tmp-" in n]
    assert leftovers == []


def test_an_output_stream_appears_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "s" / "out.bin")
    with pytest.raises(RuntimeError):
        with storage.output_stream(path) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path / "s") == []  # neither the file nor its temp
    with storage.output_stream(path) as f:
        f.write(b"whole")
    assert storage.read_bytes(path) == b"whole" and os.listdir(tmp_path / "s") == ["out.bin"]


def test_parquet_bytes_are_deterministic(tmp_path):
    table = pa.table({"id": ["x"] * 100, "v": list(range(100))})
    a = storage.write_parquet(table, str(tmp_path / "a.parquet"))
    b = storage.write_parquet(table, str(tmp_path / "b.parquet"))
    assert a == b


@pytest.mark.slow
def test_s3_roundtrip(s3_env):
    _roundtrip("s3://beit3/storage-test")
