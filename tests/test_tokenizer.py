"""Tokenizers: train / save / reload, the mntp.mask_token rules, vocabulary checks, and mask tokens in exports."""

import json

import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bidirlm_jax.data.stdlib_text import stdlib_docstrings
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.families import QWEN3_MASK_ID
from bidirlm_jax.io.tokenizer import (
    check_vocab,
    load_tokenizer,
    resolve_mask_token,
    set_mask_token,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([doc for _, doc in stdlib_docstrings()], 400, out)
    return out


def _word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A tokenizer of `size` words and no mask token (a stand-in for Qwen3's)."""
    vocab = {f"w{i}": i for i in range(size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")), unk_token="w0")


def test_trained_tokenizer_layout_save_and_reload(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer) == 400
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id] == [
        0,
        1,
        2,
        3,
    ]
    assert tokenizer.mask_token_id == 4  # as Gemma3's <mask>
    ids = tokenizer("Return the number of items.")["input_ids"]
    assert ids[0] == 2 and 2 not in ids[1:]  # BOS prepended, as Gemma does
    assert tokenizer.decode(ids[1:]) == "Return the number of items."
    reloaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert reloaded("naïve text, 123")["input_ids"] == tokenizer("naïve text, 123")["input_ids"]


def test_train_and_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="too small for a byte-level BPE"):
        train_tokenizer(["text"], 100)
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "model")


def test_mask_token_auto_token_and_id(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert resolve_mask_token(tokenizer, "auto", family="gemma3") == 4
    assert resolve_mask_token(tokenizer, "auto", family="qwen3") == 4  # its own mask token wins
    assert resolve_mask_token(tokenizer, "<unk>", family="gemma3") == 3
    assert resolve_mask_token(tokenizer, 7, family="gemma3") == 7
    assert resolve_mask_token(tokenizer, "7", family="gemma3") == 7  # as a --config override arrives
    with pytest.raises(ConfigError, match="outside the tokenizer's 400 tokens"):
        resolve_mask_token(tokenizer, 400, family="gemma3")
    with pytest.raises(ConfigError, match="'<nope>' is not a token"):
        resolve_mask_token(tokenizer, "<nope>", family="gemma3")


def test_mask_token_qwen3_reserved_row_only_when_the_vocabulary_has_it():
    qwen_sized = _word_tokenizer(151669)  # Qwen3's tokenizer size; no mask token
    assert qwen_sized.mask_token_id is None
    assert resolve_mask_token(qwen_sized, "auto", family="qwen3") == QWEN3_MASK_ID == 151663
    small = _word_tokenizer(300)
    with pytest.raises(ConfigError, match=r"lacks Qwen3's reserved row 151663.*--config.mntp.mask_token=TOKEN_OR_ID"):
        resolve_mask_token(small, "auto", family="qwen3")
    with pytest.raises(ConfigError, match=r"tokenizer has no mask token; set --config.mntp.mask_token=TOKEN_OR_ID"):
        resolve_mask_token(qwen_sized, "auto", family="gemma3")
    assert resolve_mask_token(small, "w5", family="qwen3") == 5


def test_check_vocab(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocab(tokenizer, 400)
    check_vocab(tokenizer, 512)  # embeddings may have spare rows (Qwen3: 151,936 rows, 151,669 tokens)
    with pytest.raises(ConfigError, match="ids up to 399 .* embedding has 256 rows"):
        check_vocab(tokenizer, 256)


def test_set_mask_token_in_object_and_exported_files(tmp_path):
    tokenizer = _word_tokenizer(50)
    assert set_mask_token(tokenizer, 7).mask_token_id == 7
    out = tmp_path / "export"
    _word_tokenizer(50).save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).mask_token_id is None
    set_mask_token(out, 9)
    assert json.loads((out / "tokenizer_config.json").read_text())["mask_token"] == "w9"
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.mask_token_id == 9
    assert resolve_mask_token(reloaded, "auto", family="qwen3") == 9
    with pytest.raises(ConfigError, match="not in the tokenizer's vocabulary"):
        set_mask_token(out, 50)


@pytest.mark.parametrize("remote_code", [True, False], ids=["release", "no-auto-map"])
def test_a_bidirlm_omni_directory_loads_its_tokenizer_without_the_remote_code(
    tokenizer_dir, tmp_path, monkeypatch, remote_code
):
    """The release's config.json names remote code (`auto_map`); its tokenizer is Qwen3's, loaded natively
    rather than by asking whether to run code (transformers asks through `input`). Without `auto_map` the
    model type is one transformers does not know: loaded natively too, without its warning that it builds an
    empty config from a `bidirlm_omni` one."""
    import shutil

    from transformers import configuration_utils

    omni = tmp_path / "omni"
    shutil.copytree(tokenizer_dir, omni)
    auto_map = {"AutoConfig": "BidirLM/BidirLM-Omni-2.5B-Embedding--configuration_bidirlm_omni.BidirLMOmniConfig"}
    config = {"model_type": "bidirlm_omni", **({"auto_map": auto_map} if remote_code else {})}
    (omni / "config.json").write_text(json.dumps(config))

    def ask(*_):
        raise AssertionError("asked whether to run remote code")

    warned = []
    monkeypatch.setattr("builtins.input", ask)
    monkeypatch.setattr(configuration_utils.logger, "warning", lambda msg, *a, **k: warned.append(msg))
    tokenizer = load_tokenizer(omni)
    assert not warned
    assert tokenizer("a b")["input_ids"] == load_tokenizer(tokenizer_dir)("a b")["input_ids"]
