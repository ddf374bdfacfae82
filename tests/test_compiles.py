"""Program counts, the late-compile warning, and where the persistent compilation cache goes."""

import os

import jax
import jax.numpy as jnp
import pytest

from jaxcov import compiles


def test_counted_counts_one_program_per_new_shape_and_warns_when_late(capsys):
    double = jax.jit(compiles.counted("test-double", lambda x: 2 * x,
                                      lambda x: f"x {list(x.shape)}"))
    before = compiles.count("test-double")
    with compiles.warn_if_compiled("warm-up", late=False):
        double(jnp.ones(3))
    double(jnp.zeros(3))  # same shape: no new program
    assert compiles.count("test-double") == before + 1
    with compiles.warn_if_compiled("step 4", late=True):
        double(jnp.ones(3))
    assert capsys.readouterr().err == ""
    with compiles.warn_if_compiled("step 5", late=True):
        double(jnp.ones(5))
    assert compiles.count("test-double") == before + 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "jaxcov: warning: step 5 compiled the test-double program again for x [5]")
    assert set(compiles.metrics()) == {"sampler/compiles", "score/compiles", "update/compiles",
                                       "entropy/compiles"}


@pytest.fixture
def jax_cache_config():
    """Restores the jax cache options a test changes (the session's cache must keep working)."""
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs", "jax_compilation_cache_max_size")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_persistent_cache_directory(monkeypatch, tmp_path, jax_cache_config):
    monkeypatch.setenv("JAXCOV_COMPILATION_CACHE", str(tmp_path / "xla"))
    assert compiles.enable_persistent_cache() == str(tmp_path / "xla")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert jax.config.jax_enable_compilation_cache
    assert jax.config.jax_persistent_cache_min_compile_time_secs <= 0.1
    monkeypatch.setenv("JAXCOV_COMPILATION_CACHE", "off")
    assert compiles.enable_persistent_cache() is None
    assert not jax.config.jax_enable_compilation_cache
    # Unset: jax's own setting wins, else the user cache directory (XDG, or JAXCOV_CACHE).
    monkeypatch.delenv("JAXCOV_COMPILATION_CACHE")
    monkeypatch.delenv("JAXCOV_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    jax.config.update("jax_compilation_cache_dir", None)
    assert compiles.cache_dir() == os.path.join(str(tmp_path / "user"), "jaxcov", "xla")
    monkeypatch.setenv("JAXCOV_CACHE", str(tmp_path / "mine"))
    assert compiles.cache_dir() == os.path.join(str(tmp_path / "mine"), "xla")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    assert compiles.cache_dir() == str(tmp_path / "jax")
