"""Test session set-up: 8 simulated CPU devices so sharding runs in every test."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Subprocess runs (resume, SIGTERM) compile the same programs as in-process ones: share them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jaxcov-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# `jaxcov train` / `eval` subprocesses use the same one, never the user's ~/.cache/jaxcov/xla.
os.environ.setdefault("JAXCOV_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])
# Through the environment, so subprocesses compile identical programs (and hit the cache).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402,F401  (must come after XLA_FLAGS)
