"""Documents from .txt / .jsonl / .parquet files, directories and globs, and every bad input's message."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bidirlm_jax.data.sources import iter_documents, source_files
from bidirlm_jax.errors import ConfigError


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _parquet(path, column, values):
    pq.write_table(pa.table({column: values}), path)
    return path


def test_txt_one_document_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("first doc\n\n   \nsecond, with ünïcode\r\nthird".encode())
    assert list(iter_documents(path)) == ["first doc", "second, with ünïcode", "third"]


def test_jsonl_text_field_and_custom_field(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": 1}, "", {"text": "two\nlines"}, {"text": " "}])
    assert list(iter_documents(path)) == ["one", "two\nlines"]
    other = _jsonl(tmp_path / "b.jsonl", [{"body": "x"}, {"body": "y"}])
    assert list(iter_documents(other, text_field="body")) == ["x", "y"]


def test_parquet_column(tmp_path):
    path = _parquet(tmp_path / "a.parquet", "text", ["alpha", "", "beta"])
    assert list(iter_documents(path)) == ["alpha", "beta"]
    other = _parquet(tmp_path / "b.parquet", "content", ["gamma"])
    assert list(iter_documents(other, text_field="content")) == ["gamma"]


def test_directory_and_glob_sorted_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("b1\nb2\n")
    _jsonl(tmp_path / "a.jsonl", [{"text": "a1"}])
    _parquet(tmp_path / "sub" / "c.parquet", "text", ["c1"])
    (tmp_path / "README.md").write_text("not a corpus file")
    (tmp_path / ".hidden" / "z.txt").write_text("hidden")
    assert list(iter_documents(tmp_path)) == ["a1", "b1", "b2", "c1"]
    assert [p.name for p in source_files(tmp_path)] == ["a.jsonl", "b.txt", "c.parquet"]
    assert list(iter_documents(tmp_path / "*.txt")) == ["b1", "b2"]
    assert list(iter_documents(f"{tmp_path}/**/*.parquet")) == ["c1"]


def test_recursive_glob_reads_each_file_once(tmp_path):
    """`dir/**` matches the directory, every subdirectory and every file: each names the files below it
    again, so a file at depth k came k+1 times."""
    (tmp_path / "corpus" / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("a1\n")
    (tmp_path / "corpus" / "sub" / "b.txt").write_text("b1\n")
    _jsonl(tmp_path / "corpus" / "sub" / "deeper" / "c.jsonl", [{"text": "c1"}])
    expected = ["a1", "b1", "c1"]
    assert list(iter_documents(tmp_path / "corpus")) == expected
    assert list(iter_documents(f"{tmp_path}/corpus/**")) == expected
    assert list(iter_documents(f"{tmp_path}/corpus/*")) == expected  # a.txt and the directory sub/
    assert list(iter_documents(f"{tmp_path}/corpus/**/*.txt")) == ["a1", "b1"]
    assert source_files(f"{tmp_path}/corpus/**") == source_files(tmp_path / "corpus")


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', "{not json"], r"bad\.jsonl:2: not valid JSON"),
        (['{"text": "ok"}', "", '{"body": "no text"}'], r"bad\.jsonl:3: no 'text' field \(keys \['body'\]\)"),
        (['["a", "list"]'], r"bad\.jsonl:1: no 'text' field \(a JSON list\)"),
        (['{"text": 3}'], r"bad\.jsonl:1: 'text' holds a int, not a string"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, lines, message):
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ConfigError, match=message):
        list(iter_documents(path))


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        list(iter_documents(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(ConfigError, match=r"data\.csv: cannot read \.csv files"):
        list(iter_documents(tmp_path / "data.csv"))
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(ConfigError, match="is empty"):
        list(iter_documents(tmp_path / "blank.txt"))
    (tmp_path / "latin1.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.txt:2: not UTF-8"):
        list(iter_documents(tmp_path / "latin1.txt"))
    _parquet(tmp_path / "p.parquet", "body", ["x"])
    with pytest.raises(ConfigError, match=r"p\.parquet: no 'text' column \(columns \['body'\]\)"):
        list(iter_documents(tmp_path / "p.parquet"))
    _parquet(tmp_path / "n.parquet", "text", ["x", None])
    with pytest.raises(ConfigError, match=r"n\.parquet: row 2: 'text' holds a NoneType"):
        list(iter_documents(tmp_path / "n.parquet"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(ConfigError, match="holds no .txt/.jsonl/.parquet files"):
        list(iter_documents(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no files match"):
        list(iter_documents(tmp_path / "*.nothing"))


def test_hub_corpus_offline_is_a_clear_error():
    # Tests run offline (HF_DATASETS_OFFLINE=1): the hub path must fail with a message, not a traceback.
    with pytest.raises(ConfigError, match="cannot stream hub dataset 'no-such-user/no-such-corpus'"):
        list(iter_documents("hf:no-such-user/no-such-corpus"))
