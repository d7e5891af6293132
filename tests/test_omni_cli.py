"""Every `bidirlm` verb that reads a model accepts a released BidirLM-Omni directory (a tiny one in the
release's layout, with a tokenizer holding the media tokens at its ids): convert, merge and export write
directories that load back; embed takes text and image lines; eval scores local BEIR data; train continues
it contrastively on image–text pairs with its towers frozen."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import skimage.data
from flax import nnx

from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.hf_config import read_config_dict
from bidirlm_jax.testing import omni as ref
from tests.encoders import make_beir, run_cli

QUIET = ["--config.metrics.progress_bar=False", "--config.metrics.tensorboard=False"]
ASTRONAUT = Path(skimage.data.__file__).with_name("astronaut.png")


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("omni-cli") / "release"
    ref.release_dir(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni-inputs")
    shutil.copy(ASTRONAUT, root / "a.png")
    lines = [{"text": "an astronaut"}, {"image": "a.png"}, {"image": "a.png", "text": "in a suit"}]
    (root / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    pairs = [{"query": f"caption {i}", "positive": {"image": "a.png"}} for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    make_beir(root / "beir")
    return root


VERBS = {
    "convert": lambda m, i, o: ["convert", m, o / "out"],
    "merge": lambda m, i, o: ["merge", "--model", f"{m}=1", "--model", f"{m}=3", "--out", o / "out", "--no-progress"],
    "export": lambda m, i, o: ["export", m, o / "out"],
    "embed": lambda m, i, o: ["embed", "--model", m, "--input", i / "items.jsonl", "--output", o / "out.npy"],
    "eval": lambda m, i, o: ["eval", "--model", m, "--beir", i / "beir", "--no-progress", "--output", o / "out.json"],
    "train": lambda m, i, o: [
        *("train", "--config", "configs/contrastive.py:tiny-image", "--workdir", o / "out", *QUIET),
        *("--config.train.steps=2", "--config.data.global_batch_size=8", "--config.data.source=pairs"),
        f"--config.data.path={i / 'pairs.jsonl'}",
        f"--config.model.init_from={m}",
    ],
}


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_accepts_a_released_omni_directory(omni_dir, inputs, tmp_path, verb):
    assert run_cli(VERBS[verb](omni_dir, inputs, tmp_path)) == 0
    out = next(tmp_path.glob("out*"))
    if verb == "embed":
        embeddings = np.load(out)
        assert embeddings.shape == (3, 64) and np.isfinite(embeddings).all()
        assert not np.allclose(embeddings[1], embeddings[2], atol=1e-4)  # the text beside the image counts
        return
    if verb == "eval":
        assert json.loads(out.read_text())
        return
    loaded = from_pretrained(out)  # what each wrote loads back, with its towers
    assert hasattr(loaded, "visual") and hasattr(loaded, "audio_tower")
    if verb in ("merge", "export"):
        assert read_config_dict(out)["model_type"] == "bidirlm_omni"
    if verb == "train":  # the towers stayed as the release had them
        source = from_pretrained(omni_dir)
        for tower in ("visual", "audio_tower"):
            for a, b in zip(_leaves(getattr(source, tower)), _leaves(getattr(loaded, tower)), strict=True):
                np.testing.assert_array_equal(a, b)


def _leaves(module) -> list:
    return jax.tree.leaves(nnx.state(module, nnx.Param))
