"""A persistent XLA compilation cache shared by the tests that build whole runs (in-process and in
subprocesses and notebook kernels): the tiny preset compiles the same programs in every run, and
compiling dominates their time."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

# One directory per pytest-xdist worker: two processes never write the same cache entry.
DIRECTORY = str(Path(tempfile.gettempdir())
                / f"fedlora_jax_test_xla_cache{os.environ.get('PYTEST_XDIST_WORKER', '')}")
ENV = {"JAX_COMPILATION_CACHE_DIR": DIRECTORY,
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def enable() -> None:
    """Turns the cache on in this process and, through the environment, in its children."""
    os.environ.update(ENV)
    jax.config.update("jax_compilation_cache_dir", DIRECTORY)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()  # re-read the settings above on the next compile


def disable() -> None:
    """Turns the cache off in this process again, so that it stays with the test modules that
    ask for it (``tests/conftest.py`` calls this after each module). Writing some solver
    executables to the cache late in a long test process has aborted the process (JAX 0.10.2,
    CPU), while the same tests pass with the cache off or in a short process."""
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
