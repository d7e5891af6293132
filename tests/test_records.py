"""The one record reader (`data.records`): every format, origins, and errors that name the file and line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bidirlm_jax.data import pairs, records
from bidirlm_jax.data.labeled import read_split
from bidirlm_jax.data.records import ROWS, Field, read_file, read_records, row_field
from bidirlm_jax.errors import ConfigError


def test_every_format_and_its_origins(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n\n["y"]\n')
    (tmp_path / "b.csv").write_text('text,label\n"two\nlines",1\nz,2\n')
    (tmp_path / "c.txt").write_text("one\n\nthree\r\n")
    pq.write_table(pa.Table.from_pylist([{"text": "p", "n": 1}, {"text": "q", "n": 2}]), tmp_path / "d.parquet")
    got = list(read_records(tmp_path, extensions=records.FILE_FORMATS, formats="anything", text_field="body"))
    base = str(tmp_path)
    assert got == [
        (f"{base}/a.jsonl:1", {"text": "x"}),
        (f"{base}/a.jsonl:3", ["y"]),  # blank jsonl lines are skipped, their numbers kept
        (f"{base}/b.csv:3", {"text": "two\nlines", "label": "1"}),  # a CSV row's last line
        (f"{base}/b.csv:4", {"text": "z", "label": "2"}),
        (f"{base}/c.txt:1", {"body": "one"}),
        (f"{base}/c.txt:2", {"body": ""}),  # txt keeps blank lines: callers decide
        (f"{base}/c.txt:3", {"body": "three"}),
        (f"{base}/d.parquet: row 1", {"text": "p", "n": 1}),
        (f"{base}/d.parquet: row 2", {"text": "q", "n": 2}),
    ]
    assert list(read_file(tmp_path / "d.parquet", columns=["n"])) == [
        (f"{base}/d.parquet: row 1", {"n": 1}),
        (f"{base}/d.parquet: row 2", {"n": 2}),
    ]
    assert list(records.hub_records("user/set:cfg", "validation", [{"a": 1}])) == [
        ("hf:user/set:cfg[validation] row 1", {"a": 1})
    ]


def test_undecodable_bytes_name_the_line_in_every_reader(tmp_path):
    """Before the one reader, `.jsonl`/`.csv` of pairs, labeled examples and BEIR data raised a bare
    UnicodeDecodeError (a traceback with neither file nor line)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"query": "q", "positive": "p", "text": "t", "label": "a"}\n{"query": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: not UTF-8 text"):
        pairs.read_pairs(bad)
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: not UTF-8 text"):
        read_split(bad, "classification")
    csv_file = tmp_path / "bad.csv"
    csv_file.write_bytes(b"text,label\nfine,a\ncaf\xe9,b\n")
    with pytest.raises(ConfigError, match=r"bad\.csv:3: not UTF-8 text"):
        read_split(csv_file, "classification")


def test_broken_files_are_named(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match=r"x\.parquet: not a readable parquet file"):
        list(read_file(tmp_path / "x.parquet"))
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "y.parquet")
    with pytest.raises(ConfigError, match=r"y\.parquet: no 'text' column \(columns \['body'\]\)"):
        list(read_file(tmp_path / "y.parquet", columns=["text"]))
    (tmp_path / "q.csv").write_text('a,b\n"open,1\n')
    with pytest.raises(ConfigError, match=r"q\.csv:\d+: not a CSV row"):
        list(read_file(tmp_path / "q.csv"))
    (tmp_path / "n.md").write_text("x")
    with pytest.raises(ConfigError, match=r"n\.md: cannot read \.md files"):
        list(read_file(tmp_path / "n.md"))
    with pytest.raises(ConfigError, match="cannot load hub dataset 'nobody/nothing'"):
        list(read_records("hf:nobody/nothing", extensions=(), formats=""))  # offline in tests


def test_row_contract():
    """Each kind of record declares its fields and the value kinds they take; a media kind joins as a table row."""
    assert [f.key for f in ROWS["pair"]] == ["query", "positive", "negatives", "dataset"]
    assert [f.key for f in ROWS["pair"] if f.required] == ["query", "positive"]
    beir_id, title = row_field("beir", "_id"), row_field("beir", "title")
    assert beir_id.accepts("d1") and beir_id.accepts(7) and not beir_id.accepts(True) and not beir_id.accepts(None)
    assert beir_id.expected == "a string or an integer" and title.expected == "a string or null"
    assert row_field("pair", "negatives").accepts(["a", "b"]) and not row_field("pair", "negatives").accepts(["a", 1])
    kinds = dict(records.VALUE_KINDS)
    try:  # what a tower adds: a kind, and the fields that take it
        records.VALUE_KINDS["image"] = (lambda v: isinstance(v, dict) and "image" in v, "an image")
        either = Field("query", ("text", "image"))
        assert either.accepts({"image": "cat.png"}) and either.accepts("text")
        assert either.expected == "a string or an image"
    finally:
        records.VALUE_KINDS.clear()
        records.VALUE_KINDS.update(kinds)
    assert json.dumps(sorted(records.VALUE_KINDS)) == '["id", "media", "null", "text", "texts"]'
    media = row_field("pair", "positive")  # image and audio items joined the pair's sides that way
    assert media.accepts({"image": "cat.png", "text": "a cat"}) and media.accepts({"audio": "a.wav"})
    assert not media.accepts({"picture": "cat.png"}) and not media.accepts({"text": "only text"})
