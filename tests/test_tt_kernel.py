"""The compiled lookup kernel's cache: a built module is imported without a build step; a killed
build (stale torch lock, cut-short library) never hangs or crashes a later process."""

import shutil
import subprocess
import sys

import pytest

from ranksearch.models.tensorized import tt_kernel

LOAD = "from ranksearch.models.tensorized import tt_kernel; m = tt_kernel.load(); print(m.__name__)"


@pytest.fixture
def built_copy(tmp_path, monkeypatch):
    """A copy of the kernel that `make install` built, in a cache of the test's own."""
    source = tt_kernel.build_dir()
    name = f"ranksearch_tt_lookup_{source.name}"
    if not (source / f"{name}.ok").exists():
        pytest.skip("fused TT kernel not built on this machine (make install builds it)")
    shutil.copytree(source, tmp_path / source.name)
    monkeypatch.setenv("RANKSEARCH_KERNEL_DIR", str(tmp_path))
    return tmp_path / source.name, name


def load_in_subprocess():
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_stale_torch_lock_of_a_killed_build_is_ignored(built_copy):
    where, name = built_copy
    (where / "lock").touch()  # what cpp_extension leaves when its build is killed
    assert load_in_subprocess() == name


def test_library_cut_short_is_rebuilt_not_loaded(built_copy):
    where, name = built_copy
    (where / f"{name}.so").write_bytes(b"\x7fELF" + b"\0" * 996)  # dlopen of this is a bus error
    (where / "lock").touch()
    assert load_in_subprocess() == name
    assert (where / f"{name}.ok").read_text() == str((where / f"{name}.so").stat().st_size)


def test_built_module_imports_without_building():
    if tt_kernel.kernel() is None:
        pytest.skip("the fused TT kernel could not be built here")
    where = tt_kernel.build_dir()
    module = tt_kernel._import_built(where, f"ranksearch_tt_lookup_{where.name}")
    assert module is not None and hasattr(module, "forward") and hasattr(module, "backward")
    assert tt_kernel._import_built(where, "no_such_module") is None
