"""Shared fixtures. One local Ray per test session, started on first use.

Starting Ray costs seconds, so every test that needs it shares `ray_session`;
run_search sees Ray already up and reuses it. Tests that need a cluster of their
own (several nodes, a driver killed mid-search, a `ray start` head for job
submission) run it in a subprocess, which never touches this one.
"""

from __future__ import annotations

import logging
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def _tt_kernel_built():
    """Build the fused TT lookup kernel (a few minutes, once per environment; then cached) before any
    test starts, so no test's own timeout (a sharded run's, a Ray trial's) pays for the compile."""
    from ranksearch.models.tensorized import tt_kernel

    tt_kernel.kernel()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # before the workers start: they inherit it
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_spec():
    """A spec small enough for tests: bundled digits cut to 300 images, one epoch, rank 4."""

    def make(**sections) -> dict:
        spec = {
            "name": "tiny", "models": ["mlp"], "dataset": "digits", "dataset_options": {"max_train": 300},
            "formats": ["tt"], "methods": {"fixed": {}}, "budgets": [0.2],
            "train": {"epochs": 1, "finetune_epochs": 0, "max_rank": 4, "batch_size": 64},
            "resources": {"cpu": 1},
        }
        spec.update(sections)
        return spec

    return make
