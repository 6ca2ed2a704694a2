"""The compiled lookup kernel's cache: a built module is imported without a build step, a killed
build's stale lock is cleared instead of waited on forever, a live one is waited on until released."""

import os
import threading
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


def test_live_build_lock_is_waited_on_until_released(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(1.0, lock.unlink).start()  # the other build finishes
    start = time.monotonic()
    tt_kernel._wait_for_lock(tmp_path)
    assert 0.9 < time.monotonic() - start < 10 and not lock.exists()


def test_built_module_imports_without_building():
    if tt_kernel.kernel() is None:
        pytest.skip("the fused TT kernel could not be built here")
    where = tt_kernel.build_dir()
    module = tt_kernel._import_built(where, f"ranksearch_tt_lookup_{where.name}")
    assert module is not None and hasattr(module, "forward") and hasattr(module, "backward")
    assert tt_kernel._import_built(where, "no_such_module") is None
