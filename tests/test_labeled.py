"""Labeled data: local formats and fields, label maps, label alignment on words checked by hand,
truncation counted, endless training rows, and every bad input refused by name."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bidirlm_jax.data import labeled, labeled_rows, labeled_synthetic
from bidirlm_jax.data.labeled import Fields, LabelMap, build_label_map, check_labels, read_split
from bidirlm_jax.data.labeled_rows import encode_split
from bidirlm_jax.data.stdlib_text import stdlib_docstrings
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.tokenizer import train_tokenizer
from bidirlm_jax.models.heads import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([doc for _, doc in stdlib_docstrings()][:300], 400)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_formats_and_fields(tmp_path):
    records = [{"premise": "a b", "hypothesis": "c", "gold": "yes"}, {"premise": "d", "hypothesis": "e f", "gold": 0}]
    fields = Fields(text="premise", text_pair="hypothesis", label="gold")
    (tmp_path / "csv").mkdir()
    with (tmp_path / "csv" / "x.csv").open("w") as f:
        f.write("premise,hypothesis,gold\na b,c,yes\nd,e f,0\n")
    pq.write_table(pa.Table.from_pylist([{**r, "gold": str(r["gold"])} for r in records]), tmp_path / "x.parquet")
    for source in (_jsonl(tmp_path / "x.jsonl", records), tmp_path / "csv", tmp_path / "x.parquet"):
        split = read_split(source, "classification", fields=fields)
        assert split.texts == ["a b", "d"] and split.pairs == ["c", "e f"] and split.labels == ["yes", "0"]
        assert split.where[1].endswith(("x.jsonl:2", "x.csv:3", "x.parquet: row 2"))

    words = _jsonl(
        tmp_path / "ner.jsonl", [{"tokens": ["Ann", "runs"], "tags": ["B-PER", "O"]}, {"tokens": [], "tags": []}]
    )
    split = read_split(words, "token_classification")
    assert split.tokens == [["Ann", "runs"]] and split.labels == [["B-PER", "O"]]  # the empty sentence is skipped
    with (tmp_path / "ner.csv").open("w") as f:
        f.write('tokens,tags\nAnn runs,B-PER O\n"[""Lima""]","[""B-LOC""]"\n')
    assert read_split(tmp_path / "ner.csv", "token_classification").labels == [["B-PER", "O"], ["B-LOC"]]
    scores = _jsonl(tmp_path / "r.jsonl", [{"text": "x", "label": "0.25"}, {"text": "y", "label": 1}])
    assert read_split(scores, "regression").labels == [0.25, 1.0]


def test_label_maps():
    split = labeled.LabeledSplit("train", "mem", "classification", texts=["a"] * 4, labels=["10", "9", "neg", "9"],
                                 where=["w"] * 4)  # fmt: skip
    assert build_label_map(split).names == ("9", "10", "neg")  # numbers in numeric order
    assert build_label_map(split, explicit=["neg", "10", "9", "spare"]).names == ("neg", "10", "9", "spare")
    split.label_names = ("9", "10", "neg")  # a hub dataset's ClassLabel order wins over sorting
    assert build_label_map(split).names == ("9", "10", "neg")
    tags = labeled.LabeledSplit("train", "mem", "token_classification", tokens=[["a", "b"]], labels=[["B-X", "O"]],
                                where=["w"])  # fmt: skip
    label_map = build_label_map(tags)
    assert label_map.names == ("O", "B-X")  # O first
    assert label_map.to_json()["id2label"] == {"0": "O", "1": "B-X"}
    assert LabelMap.from_json(label_map.to_json()) == label_map
    assert labeled.class_key(1, "w", ("neg", "pos")) == "pos" and labeled.class_key(True, "w") == "True"


def test_unknown_label_in_the_validation_split_is_named(tmp_path):
    train = read_split(_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]),
                       "classification")  # fmt: skip
    valid = read_split(_jsonl(tmp_path / "v.jsonl", [{"text": "a", "label": "pos"}, {"text": "c", "label": "neutral"}]),
                       "classification", name="validation")  # fmt: skip
    label_map = build_label_map(train)
    with pytest.raises(
        ConfigError, match=r"validation split, .*v.jsonl:2: label 'neutral' is not one of .*\['neg', 'pos'\]"
    ):
        check_labels(valid, label_map)


@pytest.mark.parametrize(
    "content, task, message",
    [
        ("", "classification", "holds no examples"),
        ('{"text": "a"}\n', "classification", r"x.jsonl:1: no 'label' field"),
        ('{"text": 3, "label": "a"}\n', "classification", "'text' holds a int"),
        ('{"text": "a", "label": "high"}\n', "regression", "regression label 'label'='high' is not a number"),
        ('{"text": "a", "label": 0.5}\n', "classification", "label 0.5 is not a class"),
        ('{"tokens": ["a", "b"], "tags": ["O"]}\n', "token_classification", "2 'tokens' but 1 'tags'"),
        ("[1, 2]\n", "classification", "expected an object"),
        ("{bad\n", "classification", "x.jsonl:1: not valid JSON"),
    ],
)
def test_bad_records(tmp_path, content, task, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_split(tmp_path / "x.jsonl", task)


def test_bad_sources_and_maps(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_split(tmp_path / "missing.jsonl", "classification")
    (tmp_path / "x.txt").write_text("a\n")
    with pytest.raises(ConfigError, match="cannot read .txt files"):
        read_split(tmp_path / "x.txt", "classification")
    with pytest.raises(ConfigError, match="task 'ner' is not one of"):
        read_split(tmp_path / "x.txt", "ner")
    one = read_split(_jsonl(tmp_path / "o.jsonl", [{"text": "a", "label": "x"}]), "classification")
    with pytest.raises(ConfigError, match="single label"):
        build_label_map(one)
    with pytest.raises(ConfigError, match="lists a label twice"):
        build_label_map(one, explicit=["x", "x"])
    with pytest.raises(ConfigError, match="is not one of the run's 2 labels"):
        build_label_map(one, explicit=["y", "z"])


def test_word_labels_sit_on_each_words_first_sub_token(tokenizer):
    split = labeled.LabeledSplit("validation", "mem", "token_classification", tokens=[["Alice", "visited", "Paris"]],
                                 labels=[["B-PER", "O", "B-LOC"]], where=["w"])  # fmt: skip
    label_map = LabelMap("token_classification", ("O", "B-PER", "B-LOC"))
    encoded = encode_split(split, tokenizer, label_map, max_length=32)
    tokens = tokenizer.convert_ids_to_tokens(encoded.ids.tolist())
    # checked by hand: the same tokens as the running text "Alice visited Paris" (words after the first
    # carry their space: "Ġv", "Ġ"), the tag on each word's first piece, nothing on <bos> or later pieces
    assert tokens == ["<bos>", "A", "l", "ic", "e", "Ġv", "is", "it", "ed", "Ġ", "P", "ar", "is"]
    assert tokenizer("Alice visited Paris")["input_ids"] == encoded.ids.tolist()
    X = IGNORE_INDEX
    assert encoded.labels.tolist() == [X, 1, X, X, X, 0, X, X, X, 2, X, X, X]
    assert encoded.word_starts[0].tolist() == [1, 5, 9] and encoded.word_labels[0].tolist() == [1, 0, 2]
    row = encoded.row(0, 16, pad_id=0)
    assert row["labels"].tolist()[13:] == [X] * 3 and row["attention_mask"].sum() == 13

    cut = encode_split(split, tokenizer, label_map, max_length=7)  # "Paris" and most of "visited" cut
    assert cut.word_starts[0].tolist() == [1, 5, -1] and cut.num_dropped_words == 1 and cut.num_truncated == 1


def test_word_labels_follow_the_running_texts_character_offsets(tokenizer):
    """On real sentences, each word's label sits on the first token whose characters overlap that word in
    the running text (the fast tokenizer's character offsets, not the word_ids() the code aligns with),
    and every other position is ignored."""
    sentences = [doc.split()[:12] for _, doc in stdlib_docstrings()[300:340] if len(doc.split()) >= 3]
    rng = np.random.default_rng(0)
    names = ("O", "B-X", "I-X")
    tags = [[names[t] for t in rng.integers(0, 3, len(words))] for words in sentences]
    split = labeled.LabeledSplit("train", "mem", "token_classification", tokens=sentences, labels=tags,
                                 where=[f"line {i}" for i in range(len(sentences))])  # fmt: skip
    label_map = LabelMap("token_classification", names)
    encoded = encode_split(split, tokenizer, label_map, max_length=512)
    for i, words in enumerate(sentences):
        text = " ".join(words)
        # word k covers text[starts[k] : ends[k]], with the space before it (as in the hand-checked test above,
        # a word after the first carries its space, so a lone "Ġ" token opens the word that follows it)
        ends = np.cumsum([len(w) + 1 for w in words]) - 1
        starts = np.array([0] + list(ends[:-1]))
        enc = tokenizer(text, return_offsets_mapping=True)
        expected, seen = [], set()
        for start, end in enc["offset_mapping"]:
            hit = [k for k in range(len(words)) if start < ends[k] and end > starts[k]]
            first = hit and hit[0] not in seen
            expected.append(label_map.id(tags[i][hit[0]], "test") if first else IGNORE_INDEX)
            seen.update(hit[:1])
        lo, hi = encoded.offsets[i], encoded.offsets[i + 1]
        assert encoded.ids[lo:hi].tolist() == enc["input_ids"], i
        assert encoded.labels[lo:hi].tolist() == expected, i
        assert len(seen) == len(words)  # every word labelled once
    assert sum(len(w) for w in sentences) > 3 * len(sentences) and (encoded.labels == 2).any()


def test_sequences_and_pairs_are_cut_and_counted(tokenizer):
    split = labeled.LabeledSplit("train", "mem", "classification", texts=["short", "a much longer text " * 5],
                                 pairs=["b", "c"], labels=["x", "y"], where=["1", "2"])  # fmt: skip
    label_map = LabelMap("classification", ("x", "y"))
    encoded = encode_split(split, tokenizer, label_map, max_length=12)
    assert encoded.num_truncated == 1 and encoded.lengths.tolist()[1] == 12
    assert encoded.ids[: encoded.offsets[1]].tolist() == tokenizer("short", "b")["input_ids"]
    assert encoded.labels.tolist() == [0, 1]
    regression = labeled.LabeledSplit("train", "mem", "regression", texts=["a"], labels=[0.5], where=["1"])
    assert encode_split(regression, tokenizer, LabelMap("regression"), max_length=8).labels.dtype == np.float32


def test_an_example_without_tokens_is_refused():
    class NoSpecials:  # like Qwen3's tokenizer: adds no special token, so "" gives no token at all
        is_fast = True

        def __call__(self, texts, pairs=None, **kwargs):
            return {"input_ids": [[7] * len(t) for t in texts]}

    split = labeled.LabeledSplit("train", "mem", "classification", texts=["ab", ""], labels=["x", "y"],
                                 where=["f:1", "f:2"])  # fmt: skip
    with pytest.raises(ConfigError, match="train split, f:2: the text gives no token"):
        encode_split(split, NoSpecials(), LabelMap("classification", ("x", "y")), max_length=8)


def test_train_rows_are_endless_and_reshuffled_per_epoch(tokenizer):
    split = labeled_synthetic.synthetic_split("classification", 10, seed=0)
    label_map = build_label_map(split)
    encoded = encode_split(split, tokenizer, label_map, max_length=24)
    rows = labeled_rows.TrainRows(encoded, seq_len=24, pad_id=0, seed=3)
    first = [int(rows[i]["labels"]) for i in range(10)]
    epochs = [[rows[e * 10 + i]["input_ids"].tobytes() for i in range(10)] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]  # each epoch: all examples, reordered
    assert sorted(first) == sorted(encoded.labels.tolist())
    assert len(rows) > 10**12 and rows[10**12]["input_ids"].shape == (24,)
    again = labeled_rows.TrainRows(encoded, seq_len=24, pad_id=0, seed=3)
    assert all(np.array_equal(rows[i]["input_ids"], again[i]["input_ids"]) for i in range(30))


def test_synthetic_tasks_are_deterministic():
    for task in ("classification", "regression", "token_classification"):
        a, b = (labeled_synthetic.synthetic_split(task, 50, seed=1) for _ in range(2))
        assert a.labels == b.labels and (a.texts or a.tokens) == (b.texts or b.tokens)
        assert labeled_synthetic.synthetic_split(task, 50, seed=1, name="validation").labels != a.labels
    ner = labeled_synthetic.synthetic_split("token_classification", 50, seed=0)
    assert {t for s in ner.labels for t in s} == {"O", "B-PER", "I-PER", "B-LOC"}
    with pytest.raises(ConfigError, match="positive size"):
        labeled_synthetic.synthetic_split("classification", 0, seed=0)
