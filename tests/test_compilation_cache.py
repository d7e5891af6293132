"""The persistent compilation cache of the CLI and notebooks: where it goes, its off switch, and that a second
process reads what the first compiled (a small CPU program, below jax's default 1 s threshold)."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from bidirlm_jax import enable_compilation_cache
from bidirlm_jax.cli import main
from bidirlm_jax.compilation_cache import ENV, MIN_COMPILE_SECS

KEYS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(autouse=True)
def restore_jax_config(monkeypatch):
    """Each test changes the process's jax settings; the rest of the session gets them back."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    before = {key: getattr(jax.config, key) for key in KEYS}
    yield
    for key, value in before.items():
        jax.config.update(key, value)
    jax_cache.reset_cache()


def test_a_given_path_beats_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "from-env"))
    assert enable_compilation_cache(tmp_path / "given") == tmp_path / "given"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given")
    assert jax.config.jax_enable_compilation_cache is True
    assert jax.config.jax_persistent_cache_min_compile_time_secs == MIN_COMPILE_SECS
    assert (tmp_path / "given").is_dir() and not (tmp_path / "from-env").exists()


def test_the_environment_beats_jax_own_setting(tmp_path, monkeypatch):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    monkeypatch.setenv(ENV, str(tmp_path / "from-env"))
    assert enable_compilation_cache() == tmp_path / "from-env"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "from-env")


def test_a_directory_jax_was_given_is_kept(tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    assert enable_compilation_cache() == tmp_path / "jax"


def test_default_is_under_the_user_cache_dir(tmp_path, monkeypatch):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert enable_compilation_cache() == tmp_path / "bidirlm_jax" / "jax"
    assert (tmp_path / "bidirlm_jax" / "jax").is_dir()


def test_a_users_own_threshold_stands(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "3")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 3.0)
    enable_compilation_cache(tmp_path)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 3.0


@pytest.mark.parametrize("word", ["off", "OFF", "0", "false", "no"])
def test_off_switches_caching_off(word, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, word)
    assert enable_compilation_cache() is None
    assert jax.config.jax_enable_compilation_cache is False
    enable_compilation_cache(tmp_path)  # and a later call turns it back on
    assert jax.config.jax_enable_compilation_cache is True


def test_cli_flag_sets_the_cache_before_the_command_runs(tmp_path):
    status = main(["--compilation-cache", str(tmp_path / "cli"), "embed", "--model", str(tmp_path / "missing"),
                   "--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "out.npy")])  # fmt: skip
    assert status == 2  # the missing model, after the cache was set up
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cli")


PROGRAM = textwrap.dedent(
    """
    import sys
    from bidirlm_jax import enable_compilation_cache
    enable_compilation_cache(sys.argv[1])  # before jax is imported: through the environment
    import jax, jax.numpy as jnp, numpy as np
    events = []
    jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
    def layers(x):
        for i in range(20):
            x = jnp.tanh(x @ x.T + i)
        return x
    jax.jit(layers)(np.ones((8, 8), np.float32)).block_until_ready()  # the only program
    print(events.count("/jax/compilation_cache/cache_hits"), events.count("/jax/compilation_cache/cache_misses"))
    """
)


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != ENV}
    runs = [
        subprocess.run(
            [sys.executable, "-c", PROGRAM, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
        )
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    (hits1, misses1), (hits2, misses2) = (map(int, r.stdout.split()) for r in runs)
    assert misses1 >= 1 and hits1 == 0  # the first process compiles `layers` and writes it
    assert hits2 >= 1 and misses2 == 0  # the second reads it back
    assert any(f.name.startswith("jit_layers") for f in tmp_path.iterdir())
