"""LoRA training runs end to end: checkpoints hold the adapters only and resume bit for bit, the merged export is
the adapted model, PEFT loads the adapter export onto transformers' model of the base and gives the same hidden
states, and a LoRA fine-tuning run learns its task."""

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from bidirlm_jax import from_pretrained
from bidirlm_jax.cli import main as cli_main
from bidirlm_jax.io.hf import load_adapted
from bidirlm_jax.io.hf_config import read_runtime
from bidirlm_jax.io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from bidirlm_jax.models import lora
from tests.encoders import make_encoder_src
from tests.runs import checkpoint_params, metrics_of

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--config.metrics.progress_bar=False", "--config.metrics.tensorboard=False"]
IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 8, 11, 2], [9, 33, 71, 4, 18, 6, 0, 0, 0, 0]])
MASK = (np.arange(10)[None] < np.array([[10], [6]])).astype(np.int32)


@pytest.fixture(scope="module")
def base(qwen_dir, tmp_path_factory):
    """The tiny Qwen3 with a tokenizer: the checkpoint the runs adapt."""
    return make_encoder_src(qwen_dir, tmp_path_factory.mktemp("lora") / "base")


def _cli(*args) -> int:
    return cli_main([str(a) for a in args])


def _mntp(base, workdir, steps):
    args = ["train", "--config", f"{ROOT}/configs/mntp.py:tiny", "--workdir", str(workdir), *QUIET]
    args += [f"--config.model.init_from={base}", "--config.lora.rank=4", "--config.lora.dropout=0.1"]
    args += [f"--config.train.steps={steps}", "--config.train.checkpoint_every=2", "--config.optim.warmup_steps=1"]
    assert cli_main(args) == 0


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """A 4-step MNTP LoRA run of the base."""
    workdir = tmp_path_factory.mktemp("lora") / "run"
    _mntp(base, workdir, 4)
    return workdir


def _stored_paths(workdir, step) -> set[str]:
    tree = ocp.StandardCheckpointer().metadata(workdir / "checkpoints" / str(step) / "state").item_metadata.tree
    return {"/".join(str(k.key) for k in path[:-1]) for path, _ in _flatten(tree["params"])}


def _flatten(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_a_lora_run_checkpoints_only_its_adapters_and_resumes_bit_for_bit(base, run, tmp_path):
    paths = _stored_paths(run, 4)
    assert paths and all("_lora/lora_" in p for p in paths)  # no base weight in the checkpoint
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert len(paths) == layers * 7 * 2  # every layer's seven projections, A and B
    adapters = sum(x.nbytes for x in checkpoint_params(run, 4))
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert adapters < base_bytes / 10
    resumed = tmp_path / "resumed"
    _mntp(base, resumed, 2)
    _mntp(base, resumed, 4)  # the same command, further: resumes at step 2 (the base read again from init_from)
    for got, want in zip(checkpoint_params(resumed, 4), checkpoint_params(run, 4), strict=True):
        np.testing.assert_array_equal(got, want)
    assert metrics_of(resumed)[-1]["loss"] == metrics_of(run)[-1]["loss"]


def test_the_merged_export_is_the_adapted_model(base, run, tmp_path):
    adapted = load_adapted(run, read_runtime(run / "model"))
    assert lora.has_adapters(adapted)
    want = adapted(IDS, MASK)
    merged = from_pretrained(run)  # a LoRA run reads as its base with the adapters merged
    assert not lora.has_adapters(merged)
    got = merged(IDS, MASK)
    base_logits = from_pretrained(base, attention="bidirectional")(IDS, MASK).logits
    scale = float(np.abs(want.logits).max())
    assert float(np.abs(np.asarray(want.logits) - base_logits).max()) > 1e-4 * scale  # the run changed the model
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=1e-5 * scale)
    assert _cli("export", run, tmp_path / "enc") == 0  # --lora merge is the default
    assert not (tmp_path / "enc" / "lora.json").exists()  # the adapters are in the weights now
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(tmp_path / "enc", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()
    real = MASK.astype(bool)
    hidden = np.asarray(want.hidden_states)
    np.testing.assert_allclose(theirs[real], hidden[real], rtol=0, atol=1e-4 * np.abs(hidden).max())


def test_peft_loads_the_adapter_export_and_gives_our_hidden_states(base, run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    assert _cli("export", run, tmp_path / "adapter", "--lora", "peft") == 0
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16.0
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    assert _cli("export", base, tmp_path / "base_encoder") == 0  # the base, bidirectional, as users load it
    model = AutoModel.from_pretrained(tmp_path / "base_encoder", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()
    ours = np.asarray(load_adapted(run, read_runtime(run / "model"))(IDS, MASK).hidden_states)
    real = MASK.astype(bool)
    # fp32, PEFT adds the unmerged update as we do; torch and XLA order the sums differently
    np.testing.assert_allclose(theirs[real], ours[real], rtol=0, atol=1e-4 * np.abs(ours).max())


@pytest.mark.slow  # 60 steps and two validations
def test_a_lora_fine_tuning_run_learns_and_exports_its_head_with_the_adapters_merged(base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from bidirlm_jax.io.heads import load_finetuned

    run = tmp_path / "ft"
    args = ["train", "--config", f"{ROOT}/configs/finetune.py:tiny", "--workdir", run, *QUIET]
    args += [f"--config.model.init_from={base}", "--config.finetune.pooling=last", "--config.lora.rank=8"]
    assert _cli(*args, "--config.train.steps=60", "--config.evals.validation.every=30") == 0
    scores = [m["eval/accuracy"] for m in metrics_of(run) if "eval/accuracy" in m]
    assert scores[-1] >= 0.75  # two balanced classes: chance is 0.5
    paths = _stored_paths(run, 60)
    assert {p for p in paths if not p.startswith("head/")} == {p for p in paths if "_lora/" in p}
    assert any(p.startswith("head/") for p in paths)  # the head trains beside the adapters
    model, _ = load_finetuned(run)  # the best step: its adapters merged, its head
    assert not lora.has_adapters(model)
    assert _cli("export", run, tmp_path / "out") == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = np.where(MASK == 1, IDS, hf.config.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(MASK)).logits.numpy()
    ours = np.asarray(model(ids, MASK).logits)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4 * np.abs(ours).max())


def test_a_run_adapting_a_random_init_or_a_vanished_base_is_refused_by_name(run, tmp_path, capsys):
    import shutil

    from bidirlm_jax.errors import CheckpointError

    assert _cli("merge", "--model", f"{run}=1", "--out", tmp_path / "merged") == 2  # merge reads weights: export first
    assert "is a LoRA run" in capsys.readouterr().err

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    record = json.loads((copy / "model" / "lora.json").read_text())
    for base, message in (("", "randomly initialised model"), (str(tmp_path / "gone"), "which is gone")):
        (copy / "model" / "lora.json").write_text(json.dumps({**record, "base": base}))
        with pytest.raises(CheckpointError, match=message):
            from_pretrained(copy)


def test_a_scanned_contrastive_lora_run_with_gradcache_trains_and_exports_per_layer(base, tmp_path):
    run = tmp_path / "con"
    args = ["train", "--config", f"{ROOT}/configs/contrastive.py:tiny", "--workdir", run, *QUIET]
    args += [f"--config.model.init_from={base}", "--config.model.scan_layers=True", "--config.lora.rank=4"]
    args += ["--config.lora.dropout=0.1", "--config.train.steps=2", "--config.optim.warmup_steps=1"]
    assert _cli(*args) == 0  # GradCache (chunk_size 4): the chunks' two passes draw the same dropout masks
    paths = _stored_paths(run, 2)
    assert paths and all(p.startswith("layers/") and "_lora/" in p and not p.split("/")[1].isdigit() for p in paths)
    adapted = load_adapted(run, read_runtime(run / "model"))  # stacked, as it trained
    assert adapted.runtime.scan_layers and float(np.abs(adapted.layers.mlp.up_proj_lora.lora_b[...]).max()) > 0
    merged = from_pretrained(run)  # per layer, the default layout
    want = np.asarray(adapted(IDS, MASK).hidden_states)
    np.testing.assert_allclose(merged(IDS, MASK).hidden_states, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert _cli("export", run, tmp_path / "adapter", "--lora", "peft") == 0
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert len(tensors) == layers * 7 * 2  # unstacked, one pair per layer and projection
    up = adapted.layers.mlp.up_proj_lora
    np.testing.assert_array_equal(tensors["base_model.model.layers.1.mlp.up_proj.lora_B.weight"], up.lora_b[...][1])


def test_adapter_gradients_equal_transformers_and_peft(qwen_dir, tmp_path):
    """The same adapters (B random) on our model and, through the PEFT export, on transformers' model: the gradients
    of one loss w.r.t. A and B agree to fp32 rounding of two implementations (1e-4 of the largest)."""
    import jax
    from flax import nnx
    from peft import PeftModel
    from transformers import AutoModel

    from bidirlm_jax import save_pretrained
    from bidirlm_jax.io.lora import save_peft

    ours = from_pretrained(qwen_dir, attention="bidirectional")
    save_pretrained(ours, tmp_path / "base")
    adapters = lora.LoRAConfig(rank=4, alpha=8.0)
    lora.add_adapters(ours, adapters, rngs=nnx.Rngs(1))
    for i, (_, _, adapter) in enumerate(lora.adapters(ours)):
        adapter.lora_b.set_value(0.05 * jax.random.normal(jax.random.PRNGKey(i), adapter.lora_b.shape))
    save_peft(ours, adapters, tmp_path / "adapter", base=str(tmp_path / "base"))
    cotangent = np.random.default_rng(0).standard_normal((*IDS.shape, ours.config.hidden_size)).astype(np.float32)
    weight = cotangent * MASK[..., None]  # padding's hidden states carry no loss

    graphdef, params, rest = nnx.split(ours, lora.LoRAParam, ...)

    def loss(p):
        return jax.numpy.sum(nnx.merge(graphdef, p, rest).hidden_states(IDS, MASK) * weight)

    grads = jax.grad(loss)(params)
    model = AutoModel.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, tmp_path / "adapter", is_trainable=True)
    hidden = peft_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state
    (hidden * torch.tensor(weight)).sum().backward()
    theirs = {
        name.removesuffix(".default.weight") + ".weight": p.grad.numpy()
        for name, p in peft_model.named_parameters()
        if "lora_" in name
    }
    ours_flat = {}
    for i, block in enumerate(grads["layers"].values()):
        for owner, module in (("self_attn", block["attn"]), ("mlp", block["mlp"])):
            for key, value in module.items():
                name = key.removesuffix("_lora")
                a, b = np.asarray(value["lora_a"][...]), np.asarray(value["lora_b"][...])
                prefix = f"base_model.model.layers.{i}.{owner}.{name}"
                ours_flat[f"{prefix}.lora_A.weight"] = a.reshape(a.shape[0], -1)
                ours_flat[f"{prefix}.lora_B.weight"] = b.reshape(-1, b.shape[-1])
    assert ours_flat.keys() == theirs.keys()
    for key, want in theirs.items():
        np.testing.assert_allclose(ours_flat[key], want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=key)
