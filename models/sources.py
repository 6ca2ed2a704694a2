"""Import paths to user code, "package.module:attribute" (dots after the colon walk attributes).

A user's project is importable the way `python -m` would see it: the current directory (and,
on Ray workers, the directory the search was started from) goes on sys.path first. Errors name
the spec field and say what is missing, so `ranksearch validate` can report them before Ray starts.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_import_path(value) -> bool:
    return isinstance(value, str) and IMPORT_PATH.fullmatch(value) is not None


def add_project_dir(directory: str | None = None) -> None:
    """Put the user's project (default: the current directory) first on sys.path, once."""
    directory = os.path.abspath(directory or os.getcwd())
    if os.path.isdir(directory) and directory not in sys.path:
        sys.path.insert(0, directory)


def resolve(path: str, field: str, project_dir: str | None = None):
    """The object `path` names; ValueError naming `field` when the module or attribute is missing."""
    if not is_import_path(path):
        raise ValueError(f"{field}: expected an import path 'package.module:name', got {path!r}")
    add_project_dir(project_dir)
    add_project_dir()
    module_name, _, attribute = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{field}: cannot import module {module_name!r} of {path!r} ({exc}); run from the "
                         "directory that holds it or put it on PYTHONPATH") from None
    except Exception as exc:
        raise ValueError(f"{field}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{field}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj
