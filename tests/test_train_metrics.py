"""FLOPs/MFU accounting and the metrics writers (metrics.jsonl, TensorBoard)."""

import json

import pytest

from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.train.metrics import MetricsWriter, mfu, peak_flops_per_device, training_flops_per_token

CAUSAL = Runtime()


def test_flops_of_the_benchmark_model_are_6n_plus_attention():
    config = get_preset("bench-qwen3")  # hidden 512, mlp 1536, 8 layers, 8/4 heads of 64, vocab 32000, tied
    matmul_params = 8 * (512 * 64 * (8 + 4 + 4 + 8) + 3 * 512 * 1536) + 512 * 32000  # + LM head (tied, still a matmul)
    attention = 8 * 12 * 8 * 64 * (512 + 1) / 2  # causal: a query sees (T+1)/2 keys on average
    assert training_flops_per_token(config, 512, runtime=CAUSAL) == pytest.approx(6 * matmul_params + attention)
    bidirectional = Runtime(attention="bidirectional")
    flops = training_flops_per_token(config, 512, runtime=bidirectional)
    assert flops == pytest.approx(6 * matmul_params + 8 * 12 * 8 * 64 * 512)


def test_sliding_layers_count_their_window():
    config = get_preset("tiny-gemma3")  # window 8; all 4 layers sliding (the 5:1 pattern's global one is the 6th)
    base = training_flops_per_token(config.replace(layer_types=("full_attention",) * 4), 64, runtime=CAUSAL)
    per_key = 12 * config.num_heads * config.head_dim
    sliding = sum(t == "sliding_attention" for t in config.layer_types)
    assert training_flops_per_token(config, 64, runtime=CAUSAL) == pytest.approx(base - sliding * per_key * (32.5 - 8))
    half = Runtime(attention="bidirectional", bidirectional_window="half")
    full = training_flops_per_token(config.replace(layer_types=("full_attention",) * 4), 64, runtime=half)
    assert training_flops_per_token(config, 64, runtime=half) == pytest.approx(full - sliding * per_key * (64 - 9))


def test_peak_flops_table_and_override():
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("TPU v5") == 459e12
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("cpu", override=5e11) == 5e11
    assert mfu(1e12, 2.0, 5e11, 2) == pytest.approx(0.5)
    assert mfu(1e12, 2.0, None, 2) is None


def test_writer_appends_json_lines_and_tensorboard_scalars(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 2.5, "grad_norm": 1.0, "mfu": None})
    writer.write(2, {"loss": float("nan"), "grad_norm": 1.0})
    writer.write(3, {"loss": 2.0, "grad_norm": 0.5})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 1, "loss": 2.5, "grad_norm": 1.0},
        {"step": 2, "loss": None, "grad_norm": 1.0},
        {"step": 3, "loss": 2.0, "grad_norm": 0.5},
    ]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"train/loss" in events[0].read_bytes()

    resumed = MetricsWriter(tmp_path, tensorboard=False)  # a run resumed from step 1 drops what follows
    resumed.drop_after(1)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_line_torn_by_a_crash_does_not_break_resuming(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n\n{"step": 3, "lo')  # killed mid-write
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.drop_after(2)
    writer.write(3, {"loss": 2.3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 2.5},
        {"step": 2, "loss": 2.4},
        {"step": 3, "loss": 2.3},
    ]
    assert "unreadable line" in caplog.text


def test_the_readme_says_where_mfu_is_logged_and_how_to_view_the_curves():
    """README listed `mfu` among every run's metrics, but a CPU has no known peak; and it said to run
    `tensorboard` while nothing installed it."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = root / "README.md"
    note = next(p for p in readme.read_text().split("\n\n") if "`mfu` is logged where" in p)
    assert "accelerators only" in note and "metrics.peak_flops_per_device" in note
    assert peak_flops_per_device("cpu") is None  # hence "accelerators only"
    assert any(line.startswith("tensorboard==") for line in (root / "requirements.lock").read_text().splitlines())
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("tensorboard>=") for req in extras["tensorboard"])
