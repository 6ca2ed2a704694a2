"""load_spec: a spec from a YAML file, a preset name or a dict; and the bundled presets."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from .errors import SpecError, suggest
from .schema import validate
from .spec import Spec

PRESETS_DIR = Path(__file__).parent / "presets"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float: YAML 1.1 wants `1.0e-3`, a trap for `lr: 1e-3`."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def list_presets() -> list[str]:
    """Short names of the bundled presets (search_spaces/presets/*.yaml)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of a bundled preset, e.g. preset_path("digits-quick")."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SpecError([f"preset: no preset named {name!r}; {suggest(name, list_presets())}"])
    return path


def load_spec(source: str | os.PathLike | Mapping | Spec, **user) -> Spec:
    """A validated Spec from a YAML path, a preset name or a dict; SpecError lists every problem.
    `user` (user_models, user_dataset, user_task): objects handed to run_search (schema.validate)."""
    if isinstance(source, Spec):
        return source
    if isinstance(source, Mapping):
        return Spec(**validate(source, **user))
    if not isinstance(source, (str, os.PathLike)):
        raise SpecError([f"spec: expected a YAML path, preset name or dict, got {type(source).__name__}"])
    path = _resolve(source)
    return Spec(**validate(_read_yaml(path), default_name=path.stem, source=str(path), **user))


def _read_yaml(path: Path):
    """The parsed YAML document; a syntax error becomes a SpecError naming the file and line."""
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise SpecError([f"spec: {exc}"], str(path)) from None


def _resolve(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if str(source) in list_presets():
        return preset_path(str(source))
    raise SpecError([f"spec: no file {str(source)!r} and no preset of that name; {suggest(source, list_presets())}"])
