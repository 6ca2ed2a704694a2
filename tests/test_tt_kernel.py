"""The compiled lookup kernel's cache: a built module is imported without a build step, a killed
build's stale lock is cleared instead of waited on forever, a live one is waited on only so long."""

import os
import time

import pytest

from ranksearch.models.tensorized import tt_kernel


def test_stale_build_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - tt_kernel.BUILD_WAIT_S - 5
    os.utime(lock, (old, old))
    tt_kernel._wait_for_lock(tmp_path)
    assert not lock.exists()


def test_live_build_lock_is_waited_on_then_given_up(tmp_path, monkeypatch):
    (tmp_path / "lock").touch()
    monkeypatch.setattr(tt_kernel, "BUILD_WAIT_S", 1.5)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="another process has been building"):
        tt_kernel._wait_for_lock(tmp_path)
    assert time.monotonic() - start < 10


def test_built_module_imports_without_building():
    if tt_kernel.kernel() is None:
        pytest.skip("the fused TT kernel could not be built here")
    where = tt_kernel.build_dir()
    module = tt_kernel._import_built(where, f"ranksearch_tt_lookup_{where.name}")
    assert module is not None and hasattr(module, "forward") and hasattr(module, "backward")
    assert tt_kernel._import_built(where, "no_such_module") is None
