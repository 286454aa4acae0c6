"""Source readers, the encodings of a file: gzip / zstd text, corrupt compressed files,
byte spans of plain files, and the dedup shard count they feed."""
from __future__ import annotations

import json
import os
import random

from pipelines.clean.sources import ReadLimits, SourceConfig, read_unit
from pipelines.clean.units import plan_units
from tests.pipelines.source_fixtures import read_all, reasons, zst


def test_compressed_txt_and_jsonl_read_like_plain_files(tmp_path):
    import gzip

    docs = b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(2000))
    (tmp_path / "glosses.jsonl.gz").write_bytes(gzip.compress(docs))
    (tmp_path / "glosses.jsonl.zst").write_bytes(zst(docs, frames=3))
    for name in ("glosses.jsonl.gz", "glosses.jsonl.zst"):
        recs = read_all(SourceConfig("g", "text", "jsonl", str(tmp_path / name)))
        assert [r.text for r in recs] == [f"doc {i}" for i in range(2000)], name
        assert recs[-1].location == f"{tmp_path}/{name}:2000"

    folder = tmp_path / "lines"
    folder.mkdir()
    (folder / "a.txt.gz").write_bytes(gzip.compress(b"first line\n\nsecond line\n" + b"y" * 5000 + b"\n"))
    (folder / "b.txt.gz").write_bytes(gzip.compress(b"third line\n") + gzip.compress(b"fourth line\n"))  # 2 members
    (folder / "c.txt").write_bytes(b"plain line\n")
    (folder / "d.txt.zst").write_bytes(zst(b"zstd line\n"))
    (folder / "README.md").write_text("not a source file")
    recs = read_all(SourceConfig("l", "text", "txt", str(folder)))
    assert [r.text for r in recs if not r.reject] == [b"first line", b"second line", b"third line", b"fourth line",
                                                      b"plain line", b"zstd line"]
    assert reasons(recs) == {f"{folder}/a.txt.gz:4": "line_too_long"}  # line limits hold after decompression


def test_corrupt_or_unknown_compressed_files_are_rejected_not_read_as_empty(tmp_path):
    import gzip

    docs = b"".join(json.dumps({"text": f"doc {i} " + "w" * 100}).encode() + b"\n" for i in range(30000))
    gz, zs = gzip.compress(docs), zst(docs)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (bad / "crc.jsonl.gz").write_bytes(gz[:-8] + bytes(8))                  # CRC and length zeroed
    (bad / "plain.jsonl.gz").write_bytes(docs[:1000])                       # not gzip at all
    (bad / "empty.jsonl.gz").write_bytes(b"")
    (bad / "cut.jsonl.zst").write_bytes(zs[: len(zs) // 2])
    (bad / "junk.jsonl.zst").write_bytes(os.urandom(500))
    (bad / "empty.jsonl.zst").write_bytes(b"")
    (bad / "old.jsonl.bz2").write_bytes(b"BZh9")                            # a codec clean does not read
    recs = read_all(SourceConfig("b", "text", "jsonl", str(bad)))
    got = reasons(recs)
    assert got == {f"{bad}/{n}": "corrupt_compressed_file" for n in (
        "cut.jsonl.gz", "crc.jsonl.gz", "plain.jsonl.gz", "empty.jsonl.gz", "cut.jsonl.zst", "junk.jsonl.zst",
        "empty.jsonl.zst")} | {f"{bad}/old.jsonl.bz2": "unsupported_extension"}
    kept_from = {r.location.rsplit(":", 1)[0] for r in recs if not r.reject}  # kept rows are <file>:<line>
    assert {f"{bad}/cut.jsonl.gz", f"{bad}/cut.jsonl.zst"} <= kept_from  # the lines before the cut are kept
    assert "after line" in next(r for r in recs if r.location == f"{bad}/cut.jsonl.zst").reject.detail

    # A declared file whose name says neither the format nor a known compression: one rejected row.
    (tmp_path / "glosses.gz").write_bytes(gz)
    (rec,) = read_all(SourceConfig("g", "text", "jsonl", str(tmp_path / "glosses.gz")))
    assert (rec.location, rec.reject.reason) == (f"{tmp_path}/glosses.gz", "unsupported_extension")


def test_byte_spans_read_every_line_once_with_the_file_line_numbers(tmp_path):
    """Any cut of a plain file into line-aligned byte ranges reads the same records (text,
    rejects, file:line locations) as the whole file: blank, CRLF and over-long lines too."""
    from pipelines.clean.text_files import count_newlines
    from pipelines.clean.units import newline_jobs, with_newlines

    rng = random.Random(3)
    for trial in range(60):
        lines = [b"" if rng.random() < 0.1 else b"x" * rng.randrange(1, 40) if rng.random() < 0.2
                 else json.dumps({"text": f"doc {i} " + "y" * rng.randrange(30)}).encode()
                 for i in range(rng.randrange(60))]
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
        path = tmp_path / f"f{trial}.jsonl"
        path.write_bytes(data.replace(b"\n", b"\r\n") if rng.random() < 0.2 else data)
        source, limits = SourceConfig("s", "text", "jsonl", str(path)), ReadLimits(10**9, rng.choice([30, 10**6]))
        units = plan_units(source, 1, rng.randrange(1, 50))
        units = with_newlines(units, {k: count_newlines(*job) for k, job in newline_jobs(units).items()})
        key = lambda r: (r.location, r.text, r.reject and r.reject.reason)  # noqa: E731
        whole = [key(r) for r in read_unit(source, (str(path),), limits)]
        assert [key(r) for u in units for r in read_unit(source, u, limits)] == whole, trial


def test_dedup_shards_count_the_lines_of_plain_text_and_estimate_the_rest(tmp_path):
    """The dedup shard count uses the counted rows of plain txt/JSONL (whole files and byte
    spans), not a bytes-per-row guess: short lines would put several times the configured rows
    in each shard; a compressed file, which the pass cannot count, is estimated."""
    import gzip
    import math

    from pipelines.clean.text_files import count_newlines
    from pipelines.clean.units import BYTES_PER_ROW, COMPRESSED_TEXT_RATIO, dedup_shards, newline_jobs

    lines = b"".join(b'{"text": "short %d"}\n' % i for i in range(3000))  # ~23 bytes a row
    (tmp_path / "small.jsonl").write_bytes(lines[:4000])
    (tmp_path / "big.jsonl").write_bytes(lines)
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress(lines))
    plain = [u for name in ("small", "big") for u in plan_units(
        SourceConfig(name, "text", "jsonl", str(tmp_path / f"{name}.jsonl")), 1, 10_000)]
    assert len(plain) > 2 and all(u.lines for u in plain)
    counts = {k: count_newlines(*job) for k, job in newline_jobs(plain).items()}
    assert sorted(counts) == list(range(len(plain))) and sum(counts.values()) == lines[:4000].count(b"\n") + 3000
    rows = sum(counts.values()) + len(plain)  # at most one unterminated line per unit
    assert dedup_shards([("text", plain)], 500, counts) == -(-rows // 500)
    assert dedup_shards([("text", plain)], 500) < -(-rows // 500) / 5  # the bytes guess: far too few shards
    packed = plan_units(SourceConfig("gz", "text", "jsonl", str(tmp_path / "packed.jsonl.gz")), 1, 10_000)
    assert [u.lines for u in packed] == [False] and newline_jobs(packed) == {}
    size = (tmp_path / "packed.jsonl.gz").stat().st_size
    assert dedup_shards([("text", packed)], 10) == math.ceil(size * COMPRESSED_TEXT_RATIO / BYTES_PER_ROW["text"] / 10)
