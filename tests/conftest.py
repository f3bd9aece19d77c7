"""Test-wide settings: a persistent XLA compilation cache outside the repo, so repeated runs reuse compiles."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see cvpo_jax/__init__.py

import jax

_CACHE_DIR = os.environ.get(
    "CVPO_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cvpo_jax", "xla")
)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
# Cache every compile, including the small ones the tests are full of.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest

# Test files whose tests are independent compiles (one per task) and spread over the xdist workers one test at
# a time; every other file stays on one worker, so its module-scoped runs are made once and shared.
SPREAD_FILES = {"test_envs_all.py"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Group tests by file for `pytest -n 2 --dist loadgroup`, except the per-task smoke tests.

    tryfirst: xdist's worker turns the `xdist_group` marks into node-id suffixes in its own hook of this name;
    without it that hook ran before this one, saw no marks, and every file's tests were spread over both
    workers, each worker then recomputing the module's shared runs and compiles.
    """
    for item in items:
        name = os.path.basename(str(item.fspath))
        if name not in SPREAD_FILES:
            item.add_marker(pytest.mark.xdist_group(name=name))
