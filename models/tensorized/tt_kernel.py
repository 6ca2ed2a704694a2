"""The compiled CPU kernel of the fused TT lookup (csrc/tt_lookup.cpp), built on first use.

torch.utils.cpp_extension compiles it with g++ -O3 -march=native -fopenmp into a cache directory
(`RANKSEARCH_KERNEL_DIR`, default ~/.cache/ranksearch/kernels), keyed by the source, the torch
version and install, the interpreter and the CPU's instruction set, so a machine never loads code
built for another and two virtual environments never rebuild each other's copy; `make install`
builds it once ahead of time. A finished build is imported directly (no ninja run, no lock), so
parallel processes (sharded ranks, Ray workers) only read it; builds are serialized by an flock
that dies with its holder, so a killed build never blocks (torch's own lock file would make every
later process wait forever) and its cut-short library is never loaded. A failed build, or RANKSEARCH_TT_KERNEL=0, leaves the
lookup on the pure-PyTorch path of tt_lookup.py, with the same results: the kernel is speed only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "tt_lookup.cpp"
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    key = hashlib.sha256(
        SOURCE.read_bytes() + torch.__version__.encode() + str(Path(torch.__file__).parent).encode()
        + _cpu_flags().encode() + sys.version.encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("RANKSEARCH_KERNEL_DIR", Path.home() / ".cache" / "ranksearch" / "kernels"))
    return root / key


def _with_ninja_on_path() -> None:
    """cpp_extension runs `ninja`; the pip `ninja` package puts it beside the interpreter."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for d in candidates:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _import_built(where: Path, name: str):
    """The module from a finished build, without cpp_extension's rebuild check and its lock.

    Only a build that completed is imported: `<name>.ok` holds the size of the library it wrote
    (dlopen of a library cut short by a killed build is a bus error, not an exception).
    """
    so, done = where / f"{name}.so", where / f"{name}.ok"
    try:
        if done.read_text() != str(so.stat().st_size):
            return None
    except (OSError, ValueError):
        return None
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(verbose: bool = False):
    """The compiled module; raises when it cannot be built.

    A finished build is imported directly. A build runs under an flock on `build.flock`, which the
    kernel releases when its holder dies, so concurrent trials wait for one compiler run and a killed
    build never blocks later ones; cpp_extension's own `lock` file left by a killed build is stale
    once we hold the flock and is removed (torch would wait on it forever).
    """
    import fcntl

    where = build_dir()
    name = f"ranksearch_tt_lookup_{where.name}"
    if (module := _import_built(where, name)) is not None:
        return module
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if (module := _import_built(where, name)) is not None:
            return module
        for leftover in ("lock", f"{name}.so", f"{name}.ok"):
            (where / leftover).unlink(missing_ok=True)
        from torch.utils import cpp_extension

        _with_ninja_on_path()
        module = cpp_extension.load(
            name=name, sources=[str(SOURCE)], build_directory=str(where),
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=verbose,
        )
        (where / f"{name}.ok").write_text(str((where / f"{name}.so").stat().st_size))
        return module


def kernel():
    """The compiled module, or None (disabled, or the build failed once: warned, then the PyTorch path)."""
    if "module" not in _state:
        if os.environ.get("RANKSEARCH_TT_KERNEL", "1") == "0":
            _state["module"] = None
        else:
            try:
                _state["module"] = load()
            except Exception as exc:  # no compiler, no ninja, read-only cache: the PyTorch path works
                warnings.warn(f"ranksearch: fused TT kernel not built ({type(exc).__name__}: {exc}); "
                              f"using the PyTorch lookup path", RuntimeWarning, stacklevel=2)
                _state["module"] = None
    return _state["module"]


def usable(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64) and kernel() is not None

