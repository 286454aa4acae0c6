"""Local paths and object-storage URIs behind one API, with atomic writes.

Paths may be local ("data/example") or URIs ("s3://bucket/prefix"); S3 endpoint
and credentials come from the standard AWS_* environment variables. Local
writes go to a temporary name in the same folder and are renamed into place,
so a killed stage never leaves a half-written file; an S3 PUT is atomic by
itself (the object appears only when the upload completes).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import stat
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_uri(path: str) -> bool:
    return "://" in str(path)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """Return (file system, path inside it) for a local path or a URI."""
    path = str(path)
    if path.startswith("s3://"):
        return _s3(), path[len("s3://"):].rstrip("/")
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _s3() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return pafs.S3FileSystem(region=region, allow_bucket_creation=True, **kwargs)


def join(base: str, *parts: str) -> str:
    base = str(base).rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def list_files(path: str, suffix: str = "") -> list[str]:
    """Sorted files under ``path`` (recursive) ending in ``suffix``, as the same kind of path."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [str(path)] if str(path).endswith(suffix) else []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    rels = sorted(
        i.path[len(p):].lstrip("/") for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(suffix)
        and not os.path.basename(i.path).startswith(".")
    )
    return [join(str(path), r) for r in rels]


def file_info(path: str) -> tuple[pafs.FileType, int | None]:
    """(type, size in bytes or None) of a file or folder, local or URI. Local paths use
    os.stat: far less CPU per call than pyarrow's local file system, which matters to clean,
    which looks at every image file."""
    if is_uri(path):
        fs, p = filesystem(path)
        info = fs.get_file_info(p)
        return info.type, info.size
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return pafs.FileType.NotFound, None
    if stat.S_ISDIR(st.st_mode):
        return pafs.FileType.Directory, None
    return (pafs.FileType.File if stat.S_ISREG(st.st_mode) else pafs.FileType.Unknown), st.st_size


def read_bytes(path: str) -> bytes:
    if not is_uri(path):  # plain open(): cheaper than pyarrow's local file system per file
        with open(path, "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (:func:`output_stream`). ``durable=False`` skips
    the fsync: for scratch files that a crashed run discards anyway."""
    with output_stream(path) as f:
        f.write(data)
        if durable and not isinstance(f, pa.NativeFile):  # a local file; an object store's close commits
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def output_stream(path: str):
    """A writable stream that becomes ``path`` when the block ends without an error (locally a
    temp name renamed then, so a killed writer leaves no partial ``path``; an object store
    publishes the object on close). For writes too large to build in memory first."""
    fs, p = filesystem(path)
    if not isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(p), recursive=True)
        with fs.open_output_stream(p) as f:
            yield f
        return
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str):
    return json.loads(read_bytes(path))


def write_parquet(table: pa.Table, path: str, compression: str = "zstd") -> pa.Buffer:
    """Write ``table`` atomically as Parquet; returns the file's bytes (for hashing)."""
    data = parquet_bytes(table, compression)
    write_bytes(path, data)
    return data


def parquet_bytes(table: pa.Table, compression: str = "zstd", compression_level: int | None = None,
                  row_group_rows: int | None = None) -> pa.Buffer:
    """Serialize in memory, so the bytes are deterministic for the same table and options and
    can be hashed without reading the file back; an Arrow buffer, not a ``bytes`` copy (an
    image unit's file is tens of MB)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, compression_level=compression_level,
                   row_group_size=row_group_rows, write_statistics=True)
    return sink.getvalue()


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = filesystem(path)
    return pq.read_table(p, filesystem=fs, columns=columns)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remove(path: str) -> None:
    """Delete a file or a whole folder, local or URI; nothing happens if it is absent."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def remove_temp_files(folder: str) -> None:
    """Delete ``*.tmp-*`` files directly in ``folder`` (left by storage.write_* when killed)."""
    fs, p = filesystem(folder)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(p)):
        if info.type == pafs.FileType.File and ".tmp-" in info.base_name:
            fs.delete_file(info.path)


def staging_dir(out_dir: str) -> str:
    """Where to build a whole-directory output before :func:`publish_dir` swaps it in.

    Local: a fresh temporary sibling ``<out_dir>.tmp-XXXXXXXX`` (stale ones left by killed
    runs are removed first); readers never look there. URI: ``out_dir`` itself, emptied
    (object stores have no directory rename; each object PUT is atomic by itself).
    """
    if is_uri(out_dir):
        fs, p = filesystem(out_dir)
        fs.delete_dir_contents(p, missing_dir_ok=True)
        return out_dir
    final = os.path.abspath(out_dir)
    for stale in glob.glob(glob.escape(final) + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
    staging = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)
    return staging


def publish_dir(staging: str, out_dir: str) -> None:
    """Make the complete ``staging`` directory ``out_dir`` (local: by renames only).

    The previous output is renamed aside before the new one is renamed in, so a kill at
    any moment leaves ``out_dir`` either the previous complete output, absent (between the
    two renames), or the new complete output, never a mix or a half-deleted tree.
    """
    if is_uri(out_dir):
        return
    final = os.path.abspath(out_dir)
    old = None
    if os.path.lexists(final):
        old = f"{final}.tmp-old-{uuid.uuid4().hex[:8]}"  # a stale one is cleared by staging_dir
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
