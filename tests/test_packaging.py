"""ranksearch installs as one package: a user's own `models/` package must keep working beside it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO


def test_every_package_folder_is_installed():
    """pyproject lists packages explicitly (the root maps to `ranksearch`): a new folder must be added."""
    listed = set(tomllib.loads(Path(REPO, "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"ranksearch"}
    for top in ("models", "orchestrator", "search_spaces"):
        for init in Path(REPO, top).rglob("__init__.py"):
            folders.add(".".join(("ranksearch", *init.parent.relative_to(REPO).parts)))
    folders.add("ranksearch.search_spaces.presets")  # data only
    assert folders == listed


def test_user_models_package_is_not_shadowed(tmp_path):
    """A project with its own `models/` next to its script imports both, in either order."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("OWNER = 'user'\n")
    script = (
        "import models, ranksearch, sys\n"
        "from ranksearch.models.zoo import build_model\n"
        "import ranksearch.orchestrator.cli\n"
        "assert models.OWNER == 'user', models\n"
        "assert ranksearch.FactorizedLinear.__module__.startswith('ranksearch.models.')\n"
        "assert not {'orchestrator', 'search_spaces'} & set(sys.modules), 'bare top-level package imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_import_ranksearch_is_cheap():
    """The CLI and spec validation import `ranksearch` first: it must not pull in torch or Ray."""
    script = "import ranksearch, sys; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
