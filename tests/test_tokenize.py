"""Tokenised corpora: on the fly vs `bidirlm tokenize` shards (same packed batches), manifest, resume, errors."""

import json
import pickle

import numpy as np
import pytest

from bidirlm_jax import cli
from bidirlm_jax.data import corpus_encoder, corpus_shards
from bidirlm_jax.data.corpus_shards import Corpus, load_corpus, tokenize_corpus, tokenize_documents
from bidirlm_jax.data.packing import packed_dataset
from bidirlm_jax.data.sources import iter_documents
from bidirlm_jax.data.stdlib_text import stdlib_docstrings
from bidirlm_jax.errors import BidirLMError, ConfigError
from bidirlm_jax.io.tokenizer import train_tokenizer

TEXTS = [doc for _, doc in stdlib_docstrings()][:120]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TEXTS, 320, out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from bidirlm_jax.io.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    # One document per line; "<mask>" alone tokenises to [<bos>, <mask>]: special tokens only, skipped.
    lines = [t.replace("\n", " ") for t in TEXTS[:60]]
    lines[10] = "<mask>"
    path = tmp_path_factory.mktemp("src") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def _documents(corpus: Corpus) -> list[list[int]]:
    return [corpus.document(i).tolist() for i in range(corpus.num_docs)]


def _batches(corpus: Corpus, n: int = 6) -> list[dict]:
    ds = packed_dataset(corpus, seq_len=64, seed=3).batch(4, drop_remainder=True)
    return [ds[i] for i in range(n)]


def test_documents_are_encoded_as_the_tokenizer_does(tokenizer, corpus_file):
    texts = list(iter_documents(corpus_file))
    corpus = tokenize_documents(texts, tokenizer, chunk_docs=7)
    kept = [ids for ids in tokenizer(texts)["input_ids"] if ids != [2, 4]]
    assert _documents(corpus) == kept
    assert corpus.num_docs == 59 and corpus.skipped_docs == 1
    assert corpus.num_tokens == sum(map(len, kept)) and corpus.max_token_id == max(map(max, kept))
    assert corpus.special_ids == (0, 1, 2, 3, 4) and corpus.pad_id == 0


def test_tokenize_command_gives_the_same_batches_as_on_the_fly(tokenizer, tokenizer_dir, corpus_file, tmp_path):
    on_the_fly = tokenize_documents(iter_documents(corpus_file), tokenizer)
    out = tmp_path / "tokens"
    argv = [
        "tokenize",
        str(corpus_file),
        str(out),
        "--tokenizer",
        str(tokenizer_dir),
        "--workers",
        "2",
        "--shard-tokens",
        "1500",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir())[:3] == ["corpus.json", "docs-00000.npy", "docs-00001.npy"]
    manifest = json.loads((out / "corpus.json").read_text())
    assert len(manifest["shards"]) > 2 and manifest["dtype"] == "uint32"
    assert (manifest["num_docs"], manifest["num_tokens"]) == (on_the_fly.num_docs, on_the_fly.num_tokens)
    assert manifest["skipped_docs"] == 1 and manifest["max_token_id"] == on_the_fly.max_token_id
    assert manifest["tokenizer"]["vocab_size"] == 320 and manifest["tokenizer"]["mask_id"] == 4
    assert manifest["tokenizer"]["special_ids"] == [0, 1, 2, 3, 4]

    on_disk = Corpus.load(out)
    assert isinstance(on_disk.document(0), np.memmap)
    assert _documents(on_disk) == _documents(on_the_fly)
    for a, b in zip(_batches(on_disk), _batches(on_the_fly), strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # The Python function, in one process, writes the same shards.
    again = tokenize_corpus(corpus_file, tmp_path / "again", tokenizer_dir, shard_tokens=1500, progress=False)
    assert json.loads((again / "corpus.json").read_text())["shards"] == manifest["shards"]


def test_tokenize_resumes_after_an_interruption(tokenizer, corpus_file, tmp_path, monkeypatch):
    kwargs = dict(shard_tokens=1000, chunk_docs=4, progress=False)
    reference = Corpus.load(tokenize_corpus(corpus_file, tmp_path / "reference", tokenizer, **kwargs))

    write_shard = corpus_shards._write_shard

    def killed_after_three(work, settings, index, *args):
        if index == 3:
            raise KeyboardInterrupt
        return write_shard(work, settings, index, *args)

    monkeypatch.setattr(corpus_shards, "_write_shard", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(corpus_file, tmp_path / "out", tokenizer, **kwargs)
    partial = tmp_path / ".out.partial"
    assert not (tmp_path / "out").exists() and (partial / "shard-00002.json").is_file()
    (partial / "shard-00002.json").unlink()  # killed after shard 2's arrays, before its marker

    monkeypatch.setattr(corpus_shards, "_write_shard", write_shard)
    encoded = []
    encode = corpus_encoder.Encoder.__call__
    monkeypatch.setattr(
        corpus_encoder.Encoder, "__call__", lambda self, texts: encoded.append(len(texts)) or encode(self, texts)
    )
    resumed = Corpus.load(tokenize_corpus(corpus_file, tmp_path / "out", tokenizer, **kwargs))
    assert 0 < sum(encoded) < 60  # shards 0 and 1 were not tokenised again
    assert not partial.exists()
    assert _documents(resumed) == _documents(reference) and resumed.skipped_docs == reference.skipped_docs == 1
    assert (
        json.loads((tmp_path / "out" / "corpus.json").read_text())["shards"]
        == json.loads((tmp_path / "reference" / "corpus.json").read_text())["shards"]
    )


def test_bad_inputs_write_nothing(tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert cli.main(["tokenize", str(bad), str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)]) == 2
    assert "bad.jsonl:2: no 'text' field" in capsys.readouterr().err
    only_special = tmp_path / "special.txt"
    only_special.write_text("<mask>\n<bos><eos>\n")
    with pytest.raises(ConfigError, match=r"special tokens only \(2 skipped\)"):
        tokenize_corpus(only_special, tmp_path / "out", tokenizer_dir, progress=False)
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        tokenize_corpus(bad, tmp_path / "out", tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "special.txt"]
    (tmp_path / "out").mkdir()
    with pytest.raises(BidirLMError, match="already exists"):
        tokenize_corpus(bad, tmp_path / "out", tokenizer_dir, progress=False)


def _cut_in_half(text: str) -> str:
    return text[: len(text) // 2]


def _without_num_docs(text: str) -> str:
    manifest = json.loads(text)
    del manifest["shards"][1]["num_docs"]
    return json.dumps(manifest, indent=2)


def _string_max_id(text: str) -> str:
    return json.dumps({**json.loads(text), "max_token_id": "319"})


@pytest.fixture(scope="module")
def tokenized(tokenizer, corpus_file, tmp_path_factory):
    return tokenize_corpus(
        corpus_file, tmp_path_factory.mktemp("tok") / "tokens", tokenizer, shard_tokens=1500, progress=False
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        (_cut_in_half, r"corpus\.json:\d+: not valid JSON \(.*; truncated\?\)"),
        (_without_num_docs, r"corpus\.json: shards\[1\]\.num_docs is missing \(an incomplete manifest\)"),
        (_string_max_id, r"corpus\.json: max_token_id holds \"319\", not an integer"),
        ("docs-00001.npy", r"cannot read a shard of .*corpus\.json \("),
    ],
)
def test_a_damaged_corpus_is_refused_by_train(tokenized, tokenizer_dir, tmp_path, capsys, damage, message):
    """A truncated, incomplete or hand-edited corpus: `bidirlm train` exits 2 naming the file, nothing written."""
    import re
    import shutil

    corpus = shutil.copytree(tokenized, tmp_path / "tokens")
    if callable(damage):
        (corpus / "corpus.json").write_text(damage((corpus / "corpus.json").read_text()))
    else:  # a shard file cut short (a copy that stopped part-way)
        (corpus / damage).write_bytes((corpus / damage).read_bytes()[:100])
    workdir = tmp_path / "run"
    argv = ["train", "--config=configs/mntp.py:tiny", f"--workdir={workdir}", "--config.data.source=text"]
    argv += [f"--config.data.path={corpus}", f"--config.data.tokenizer={tokenizer_dir}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not workdir.exists()


def test_load_corpus_checks_tokenizer_and_vocab(tokenizer, corpus_file, tmp_path):
    out = tokenize_corpus(corpus_file, tmp_path / "tokens", tokenizer, progress=False)
    corpus = load_corpus(out, tokenizer)
    assert corpus.path == out and corpus.num_docs == 59
    assert _documents(load_corpus(corpus_file, tokenizer)) == _documents(corpus)
    corpus.check_vocab(320)
    with pytest.raises(
        ConfigError, match=f"holds token id {corpus.max_token_id} but the model's embedding has 100 rows"
    ):
        corpus.check_vocab(100)
    other = train_tokenizer(TEXTS, 300)
    with pytest.raises(ConfigError, match="tokenised with another tokenizer"):
        load_corpus(out, other)
    # A memory-mapped corpus pickles as its path (grain worker processes), not as a copy of its tokens.
    assert len(pickle.dumps(corpus)) < 1000
    assert _documents(pickle.loads(pickle.dumps(corpus))) == _documents(corpus)


def _reserved_row_tokenizer(out, texts=TEXTS):
    """Qwen3's layout in small: no mask token, a reserved non-special added token that MNTP masks with."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = train_tokenizer(texts, 320).backend_tokenizer
    backend.add_tokens([AddedToken("<|reserved|>", special=False, normalized=False)])
    special = {f"{name}_token": f"<{name}>" for name in ("pad", "eos", "bos", "unk")}
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(out)
    return out


def test_a_recorded_mask_token_keeps_the_corpus(corpus_file, tmp_path):
    """Continuing MNTP from an MNTP checkpoint: its tokenizer records the mask token (now special), ids unchanged."""
    import shutil

    from bidirlm_jax.io.tokenizer import load_tokenizer, set_mask_token

    base = _reserved_row_tokenizer(tmp_path / "base")
    mntp = shutil.copytree(base, tmp_path / "mntp")
    reserved = load_tokenizer(base).convert_tokens_to_ids("<|reserved|>")
    set_mask_token(mntp, reserved)
    base_tok, mntp_tok = load_tokenizer(base), load_tokenizer(mntp)
    assert reserved not in base_tok.all_special_ids and reserved in mntp_tok.all_special_ids

    out = tokenize_corpus(corpus_file, tmp_path / "tokens", base, progress=False)
    corpus = load_corpus(out, mntp_tok)
    on_the_fly = load_corpus(corpus_file, mntp_tok)
    assert corpus.special_ids == on_the_fly.special_ids  # the run tokenizer's: its mask token is never masked
    for a, b in zip(_batches(corpus), _batches(on_the_fly), strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    pickled = pickle.loads(pickle.dumps(corpus))
    assert pickled.special_ids == corpus.special_ids and _documents(pickled) == _documents(corpus)

    # Same size, other merges: refused by the hash.
    other = load_tokenizer(_reserved_row_tokenizer(tmp_path / "other", TEXTS[60:]))
    assert len(other) == len(base_tok) and other.all_special_ids == base_tok.all_special_ids
    with pytest.raises(ConfigError, match="tokenised with another tokenizer"):
        load_corpus(out, other)


def test_a_corpus_written_before_tokenizer_hashes_still_loads(corpus_file, tmp_path):
    """Old manifests carry no backend hash: their special ids are compared, mask tokens aside."""
    from bidirlm_jax.io.tokenizer import load_tokenizer, set_mask_token

    base = _reserved_row_tokenizer(tmp_path / "base")
    out = tokenize_corpus(corpus_file, tmp_path / "tokens", base, progress=False)
    manifest = json.loads((out / "corpus.json").read_text())
    del manifest["tokenizer"]["backend_sha256"]
    (out / "corpus.json").write_text(json.dumps(manifest))
    reserved = load_tokenizer(base).convert_tokens_to_ids("<|reserved|>")
    assert load_corpus(out, load_tokenizer(set_mask_token(base, reserved))).num_docs == manifest["num_docs"]
    with pytest.raises(ConfigError, match="predates tokenizer hashes"):
        load_corpus(out, train_tokenizer(TEXTS, 300))


def test_txt_jsonl_parquet_give_the_same_corpus(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [t.replace("\n", " ") for t in TEXTS[:20]]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    pq.write_table(pa.table({"text": lines}), tmp_path / "c.parquet")
    corpora = [load_corpus(tmp_path / f"c.{ext}", tokenizer) for ext in ("txt", "jsonl", "parquet")]
    assert _documents(corpora[0]) == _documents(corpora[1]) == _documents(corpora[2])
    assert corpora[0].num_docs == 20
