"""Source declarations (params.yaml ``sources``) and readers for every format.

A source is split into *units* (pipelines.clean.units: files, parts of a large
file, tars, chunks of image files) so Ray can read them in parallel;
:func:`read_unit` turns one unit into :class:`Record` s, one per input row. Rows
that cannot be read (malformed JSON, a missing image, a tar member named
``../x``) come out as records carrying a
:class:`~pipelines.clean.rejects.Reject`, so they are counted and written to the
rejected output instead of disappearing.

Confinement: nothing outside a source's declared path is ever read. JSONL image
paths and tar member names that are absolute or contain ``..`` are rejected
(``path_escape``) by name, before any file system call, and local files reached
through a symlink that leaves the declared folder are rejected too. Tar
members are read from the archive stream, never extracted to disk.

Memory: readers stream. Lines are read in 1 MiB chunks (txt/JSONL, plain or
``.gz``/``.zst``: pipelines.clean.text_files) and an over-long line is skipped
without being held (``line_too_long``); Parquet is read batch by batch; tars are
read member by member (img2dataset writes a key's files next to each other, and
that adjacency is what groups them, as in WebDataset).

No file is read as zero rows without a word: a declared file is always read and
its reader rejects what it cannot interpret. An image/pair Parquet without an
``image`` column reads img2dataset's ``jpg``/``jpeg``/``png``/``webp`` column and,
where img2dataset's ``status`` and ``error_message`` columns are, rejects rows
whose status is not ``success`` (``download_failed``).
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, replace
from typing import Iterator, Literal

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.clean.archive import escapes, tar_members, wds_key
from pipelines.clean.rejects import Reject
from pipelines.clean.text_files import iter_lines, text_lines
from pipelines.common import storage
from pipelines.common.configs import check

FORMATS = {
    "text": ("txt", "jsonl", "parquet"),
    "image": ("folder", "parquet", "webdataset"),
    "pair": ("jsonl", "parquet", "webdataset"),
}
SUFFIXES = {"parquet": ".parquet", "webdataset": ".tar", "folder": ""}  # a folder's files; txt/jsonl: is_text_file
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's output formats, in preference order
PARQUET_BATCH_ROWS = 256
# The (kind, format)s each column-mapping key applies to; null keeps the default name.
COLUMN_KEYS = {
    "text_column": {("text", "jsonl"), ("text", "parquet")},
    "caption_column": {("pair", "jsonl"), ("pair", "parquet")},
    "image_column": {("image", "parquet"), ("pair", "jsonl"), ("pair", "parquet")},
}
STATUS_COLUMNS = ("status", "error_message")  # img2dataset's per-row download outcome


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: Literal["text", "image", "pair"]
    format: str
    path: str
    text_column: str | None = None     # the document's field / column (null: "text")
    caption_column: str | None = None  # the caption's (null: "caption")
    image_column: str | None = None    # the image path's (pair jsonl) / bytes' (null: "image", else jpg/png/...)

    def __post_init__(self):
        check(bool(self.name), "sources[].name: must not be empty")
        check(
            self.format in FORMATS[self.kind],
            f"sources.{self.name}.format: {self.format!r} is not a {self.kind} format; "
            f"choose one of {list(FORMATS[self.kind])}",
        )
        for key, applies in COLUMN_KEYS.items():
            value = getattr(self, key)
            if value is not None:
                check(value != "", f"sources.{self.name}.{key}: must not be empty (null: the default name)")
                check((self.kind, self.format) in applies,
                      f"sources.{self.name}.{key}: only for {' / '.join(sorted(f'{k} {f}' for k, f in applies))} "
                      f"sources, not {self.kind} {self.format}")


@dataclass(frozen=True)
class ReadLimits:
    max_file_bytes: int   # larger files / tar members are rejected unread
    max_line_bytes: int   # longer txt/JSONL lines are rejected unread
    root: str | None = None  # the source's real folder (symlinks resolved): read_unit sets it once per unit


@dataclass
class Record:
    """One input row: ``text`` (a document or a caption; bytes if undecoded), ``image`` bytes,
    or ``reject`` when it could not be read. ``raw`` feeds the id of a rejected row."""
    location: str
    text: str | bytes | None = None
    image: bytes | None = None
    reject: Reject | None = None
    raw: bytes = b""


def read_unit(source: SourceConfig, unit, limits: ReadLimits) -> Iterator[Record]:
    """Every row of one unit (a :class:`pipelines.clean.units.Unit`, or a tuple of files), in
    file order; a unit's ``span`` (a byte range or row groups of its one file) selects part
    of that file."""
    reader = READERS[(source.kind, source.format)]
    limits = replace(limits, root=_real_root(source))
    files, span = (unit, None) if isinstance(unit, tuple) else (unit.files, unit.span)
    for path in files:
        yield from reader(source, path, limits, span)


# ---------------------------------------------------------------- confinement

def _real_root(source: SourceConfig) -> str | None:
    """The folder a local source's files must resolve into (None for a URI source)."""
    if storage.is_uri(source.path):
        return None
    path = str(source.path)
    return os.path.realpath(os.path.dirname(path.rstrip("/")) if os.path.isfile(path) else path)


def _confine(source: SourceConfig, path: str, limits: ReadLimits) -> None:
    """Reject a local file whose real location (symlinks resolved) is outside the source."""
    if storage.is_uri(path):
        return
    root = limits.root or _real_root(source)
    real = os.path.realpath(path)
    if real != root and not real.startswith(root + os.sep):
        raise Reject("path_escape", f"{path} resolves to {real}, outside {root}")


def _read_file(source: SourceConfig, path: str, limits: ReadLimits) -> bytes:
    _confine(source, path, limits)
    kind, size = storage.file_info(path)
    if kind == pafs.FileType.NotFound:
        raise Reject("missing_file", f"{path} does not exist")
    if kind != pafs.FileType.File:
        raise Reject("missing_file", f"{path} is not a file")
    if size is not None and size > limits.max_file_bytes:
        raise Reject("file_too_large", f"{size} bytes > max_file_mb")
    try:
        return storage.read_bytes(path)
    except OSError as err:
        raise Reject("unreadable_file", str(err)) from err


# ---------------------------------------------------------------- lines

def _lines(path: str, fmt: str, limits: ReadLimits, span=None) -> Iterator[tuple[str, bytes | Reject, bytes]]:
    """(location, line or Reject, raw) of a txt/JSONL file's non-blank lines (those of its byte
    span); a file it cannot read (its name, a corrupt compressed stream) ends in one Reject
    located at the file."""
    try:
        for lineno, line, length in text_lines(path, fmt, limits.max_line_bytes, span):
            where = f"{path}:{lineno}"
            if line is None:
                yield where, Reject("line_too_long", f"{length} bytes > max_line_bytes"), where.encode()
            else:
                yield where, line, line
    except Reject as rej:
        yield path, rej, path.encode()


def _json_lines(path: str, limits: ReadLimits, span=None) -> Iterator[tuple[str, dict | Reject, bytes]]:
    for where, line, raw in _lines(path, "jsonl", limits, span):
        if isinstance(line, Reject):
            yield where, line, raw
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield where, Reject("invalid_utf8", str(err)), line
            continue
        except json.JSONDecodeError as err:
            yield where, Reject("malformed_json", str(err)), line
            continue
        if not isinstance(obj, dict):
            yield where, Reject("malformed_json", f"a JSON {type(obj).__name__}, not an object"), line
            continue
        yield where, obj, line


def _field(obj: dict, name: str, types: type | tuple) -> object:
    if obj.get(name) is None:
        raise Reject("missing_field", f"no {name!r} field")
    if not isinstance(obj[name], types):
        raise Reject("bad_field_type", f"{name!r} is a {type(obj[name]).__name__}")
    return obj[name]


# ---------------------------------------------------------------- text

def _text_txt(source, path, limits, span=None):
    for where, line, raw in _lines(path, "txt", limits, span):
        yield Record(where, reject=line, raw=raw) if isinstance(line, Reject) else Record(where, text=line, raw=raw)


def _text_jsonl(source, path, limits, span=None):
    for where, obj, raw in _json_lines(path, limits, span):
        try:
            if isinstance(obj, Reject):
                raise obj
            yield Record(where, text=_field(obj, source.text_column or "text", str), raw=raw)
        except Reject as rej:
            yield Record(where, reject=rej, raw=raw)


def _pair_jsonl(source, path, limits, span=None):
    folder = posixpath.dirname(path)
    for where, obj, raw in _json_lines(path, limits, span):
        try:
            if isinstance(obj, Reject):
                raise obj
            name = _field(obj, source.image_column or "image", str)
            caption = _field(obj, source.caption_column or "caption", str)
            if why := escapes(name):
                raise Reject("path_escape", why)
            image = _read_file(source, storage.join(folder, name), limits)
            yield Record(where, text=caption, image=image, raw=image)
        except Reject as rej:
            yield Record(where, reject=rej, raw=raw)


# ---------------------------------------------------------------- parquet

def _parquet_rows(source, path, kind, limits, span=None) -> Iterator[tuple[str, dict | Reject, dict]]:
    """(location, row as {column: value} or a file-level Reject, role -> column) per row (of
    the row groups of ``span``, a RowGroupSpan, numbered as in the whole file)."""
    roles = {}
    try:
        _confine(source, path, limits)
        fs, p = storage.filesystem(path)
        pfile = pq.ParquetFile(fs.open_input_file(p))
        roles = _parquet_columns(source, kind, pfile.schema_arrow.names)
        groups = list(range(span.first, span.end)) if span else None
        row = span.rows_before if span else 0
        for batch in pfile.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups,
                                        columns=sorted(set(roles.values()))):
            for values in batch.to_pylist():
                yield f"{path}:row{row}", values, roles
                row += 1
    except Reject as rej:
        yield path, rej, roles
    except (OSError, ValueError) as err:  # not Parquet, truncated, corrupt pages
        yield path, Reject("unreadable_file", f"{type(err).__name__}: {err}"), roles


def _parquet_columns(source: SourceConfig, kind: str, names: list[str]) -> dict[str, str]:
    """Role ("text": document or caption, "image", img2dataset's "status" / "error_message")
    -> column of one file; raises Reject(missing_field) naming what is absent."""
    roles = {}
    if kind == "text":
        roles["text"] = source.text_column or "text"
    else:
        found = next((c for c in ("image", *WDS_IMAGE_EXTS) if c in names), None)
        roles["image"] = source.image_column or found
        if roles["image"] is None:
            raise Reject("missing_field", f"no image column (one of {['image', *WDS_IMAGE_EXTS]}) in {names}")
        if all(c in names for c in STATUS_COLUMNS):
            roles.update(zip(STATUS_COLUMNS, STATUS_COLUMNS))
    if kind == "pair":
        roles["text"] = source.caption_column or "caption"
    missing = [c for c in roles.values() if c not in names]
    if missing:
        raise Reject("missing_field", f"no column(s) {missing} in {names}")
    return roles


def _image_value(value, column: str) -> bytes:
    if isinstance(value, dict):  # Hugging Face `Image` feature: struct<bytes, path>
        value = value.get("bytes")
    if value is None:
        raise Reject("missing_field", f"no {column!r} bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise Reject("bad_field_type", f"{column!r} is a {type(value).__name__}")
    return bytes(value)


def _parquet_record(kind: str, where: str, values: dict, roles: dict[str, str]) -> Record:
    if "status" in roles and values["status"] != "success":  # img2dataset keeps failed downloads as rows
        raise Reject("download_failed", str(values["error_message"] or f"status {values['status']!r}"))
    text = image = None
    if kind == "text":
        text = _field(values, roles["text"], (str, bytes))
    else:
        image = _image_value(values.get(roles["image"]), roles["image"])
    if kind == "pair":
        text = _field(values, roles["text"], (str, bytes))
    raw = image if image is not None else (text.encode("utf-8", "replace") if isinstance(text, str) else text)
    return Record(where, text=text, image=image, raw=raw)


def _parquet_reader(kind: str):
    def read(source, path, limits, span=None):
        for where, values, roles in _parquet_rows(source, path, kind, limits, span):
            try:
                if isinstance(values, Reject):
                    raise values
                yield _parquet_record(kind, where, values, roles)
            except Reject as rej:
                yield Record(where, reject=rej, raw=where.encode())
    return read


# ---------------------------------------------------------------- images in a folder

def _image_folder(source, path, limits, span=None):
    try:
        if not path.lower().endswith(FOLDER_IMAGE_EXTS):
            raise Reject("unsupported_extension", f"{posixpath.basename(path)} is not one of {FOLDER_IMAGE_EXTS}")
        data = _read_file(source, path, limits)
        yield Record(path, image=data, raw=data)
    except Reject as rej:
        yield Record(path, reject=rej, raw=path.encode())


# ---------------------------------------------------------------- webdataset

def _webdataset_reader(kind: str):
    def read(source, path, limits, span=None):
        try:
            _confine(source, path, limits)
        except Reject as rej:
            yield Record(path, reject=rej, raw=path.encode())
            return
        key, group = None, {}
        for name, data in tar_members(path, limits.max_file_bytes):
            if isinstance(data, Reject):
                yield Record(f"{path}:{name}", reject=data, raw=f"{path}:{name}".encode())
                continue
            k, ext = wds_key(name)
            if group and (k != key or ext in group):  # a repeated member starts a new row
                yield _wds_record(path, key, group, kind)
                group = {}
            key = k
            group[ext] = data
        if group:
            yield _wds_record(path, key, group, kind)
    return read


def _wds_record(path: str, key: str, group: dict[str, bytes], kind: str) -> Record:
    where = f"{path}:{key}"
    image = next((group[e] for e in WDS_IMAGE_EXTS if e in group), None)
    if image is None:
        return Record(where, reject=Reject("missing_image", f"members {sorted(group)}"), raw=where.encode())
    if kind != "pair":
        return Record(where, image=image, raw=image)
    try:
        return Record(where, image=image, text=_wds_caption(group), raw=image)
    except Reject as rej:
        return Record(where, reject=rej, raw=image)


def _wds_caption(group: dict[str, bytes]) -> str | bytes:
    """The ``.txt`` member (bytes, decoded by the caption steps), else the ``caption`` of the
    ``.json`` metadata (img2dataset writes it there too)."""
    if "txt" in group:
        return group["txt"]
    if "json" not in group:
        raise Reject("missing_caption", f"members {sorted(group)}")
    try:
        meta = json.loads(group["json"])
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise Reject("malformed_json", f".json member without a .txt: {err}") from err
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if not isinstance(caption, str):
        raise Reject("missing_caption", f"members {sorted(group)}; no 'caption' string in the .json")
    return caption


READERS = {
    ("text", "txt"): _text_txt,
    ("text", "jsonl"): _text_jsonl,
    ("text", "parquet"): _parquet_reader("text"),
    ("image", "folder"): _image_folder,
    ("image", "parquet"): _parquet_reader("image"),
    ("image", "webdataset"): _webdataset_reader("image"),
    ("pair", "jsonl"): _pair_jsonl,
    ("pair", "parquet"): _parquet_reader("pair"),
    ("pair", "webdataset"): _webdataset_reader("pair"),
}

__all__ = ["FORMATS", "COLUMN_KEYS", "SourceConfig", "ReadLimits", "Record", "read_unit", "iter_lines", "escapes"]
