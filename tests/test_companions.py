"""io.companions: one policy for the files that travel with weights, used by save_pretrained, convert, the
exports and merge — the towers' `preprocessor_config.json` among them."""

import json
import shutil

import pytest

import bidirlm_jax
from bidirlm_jax.io.companions import ENCODER_MODULES, companion_files
from bidirlm_jax.io.conversion import convert
from bidirlm_jax.io.sentence_transformers import export_encoder
from bidirlm_jax.io.tokenizer import train_tokenizer
from bidirlm_jax.merge import MergeModel, MergeSpec, merge_checkpoints

TRAVEL = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "LICENSE",
    "modules.json",
    "1_Pooling/config.json",
)


def _source(tmp_path, qwen_dir):
    """An HF directory with everything a model's users may need beside its weights, and what must stay."""
    src = shutil.copytree(qwen_dir, tmp_path / "src")
    for rel in TRAVEL:
        (src / rel).parent.mkdir(exist_ok=True)
        (src / rel).write_text(json.dumps({"file": rel}))
    (src / "README.md").write_text("the source's card")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    return src


def _travelled(out):
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def test_what_travels_and_what_stays(qwen_dir, tmp_path):
    src = _source(tmp_path, qwen_dir)
    (src / "onnx").mkdir()
    (src / "onnx" / "model.onnx").write_bytes(b"the source's weights")
    with pytest.warns(UserWarning, match=r"onnx/model\.onnx"):
        companions = companion_files(src)
        owned = {str(p) for p in companion_files(src, owned=ENCODER_MODULES).files}
    assert {str(p) for p in companions.files} == set(TRAVEL)  # not config.json, README, weights, hidden files
    assert owned == set(TRAVEL) - {"modules.json", "1_Pooling/config.json"}
    assert {str(p) for p in companion_files(src, subdirectories=False).files} == set(TRAVEL) - {"1_Pooling/config.json"}


def test_a_run_keeps_its_records_and_a_checkpoint_its_orbax_params(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model").mkdir()
    for name in ("config.json", "tokenizer.json", "head.json", "prompts.json", "preprocessor_config.json"):
        (run / "model" / name).write_text("{}")
    companions = companion_files(run)
    assert companions.root == run / "model"
    assert {str(p) for p in companions.files} == {"tokenizer.json", "preprocessor_config.json"}
    ckpt = tmp_path / "ckpt"
    (ckpt / "params").mkdir(parents=True)
    (ckpt / "params" / "manifest.ocdbt").write_text("orbax")
    (ckpt / "config.json").write_text("{}")
    (ckpt / "tokenizer.json").write_text("{}")
    assert [str(p) for p in companion_files(ckpt).files] == ["tokenizer.json"]


def test_convert_save_and_merge_carry_the_same_files(qwen_dir, tmp_path):
    src = _source(tmp_path, qwen_dir)
    (src / "tokenizer.json").unlink()  # the fixture's tokenizer would be an invalid JSON stand-in here
    (src / "tokenizer_config.json").unlink()
    expected = set(TRAVEL) - {"tokenizer.json", "tokenizer_config.json"}
    ckpt = convert(src, tmp_path / "ckpt")
    back = convert(ckpt, tmp_path / "back")
    saved = bidirlm_jax.save_pretrained(
        bidirlm_jax.from_pretrained(src), tmp_path / "saved", extra_files=companion_files(src)
    )
    merged = merge_checkpoints(
        MergeSpec((MergeModel(str(src), 0.5), MergeModel(str(back), 0.5))), tmp_path / "merged", progress=False
    ).out
    for out in (ckpt, back, saved, merged):
        travelled = _travelled(out)
        assert expected <= travelled, out
        assert "README.md" not in travelled and ".git/HEAD" not in travelled, out
        for rel in expected:
            assert (out / rel).read_text() == (src / rel).read_text(), (out, rel)


def test_an_encoder_export_of_a_sentence_transformers_directory_writes_its_own_modules(qwen_dir, tmp_path):
    """The source's modules describe its pooling; the export writes its own, and the processors still travel."""
    src = shutil.copytree(qwen_dir, tmp_path / "src")
    train_tokenizer(["the cat sits on the mat", "a dog runs in the park"] * 20, 300).save_pretrained(src)
    (src / "modules.json").write_text("[]")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (src / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    out = export_encoder(src, tmp_path / "encoder", pooling="mean")
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert json.loads((out / "modules.json").read_text())[1]["path"] == "1_Pooling"
    assert (out / "preprocessor_config.json").read_text() == (src / "preprocessor_config.json").read_text()
