"""load_spec: a spec from a YAML file, a preset name or a dict; and the bundled presets.

What is loaded is bounded before it is validated, so a hostile or broken file is a clear
error in milliseconds: at most MAX_SPEC_BYTES of UTF-8 text, nested at most MAX_DEPTH
levels, and at most MAX_NODES values once YAML aliases are expanded (a "billion laughs"
file is a few hundred bytes that expand to 10^9 values). A real spec is a few kB, a few
levels deep and a few hundred values.
"""

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
MAX_SPEC_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NODES = 100_000


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
    """The parsed YAML document, within the limits above; every problem is a SpecError naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError([f"spec: the file is {size:,} bytes; a spec may be at most {MAX_SPEC_BYTES:,}"], str(path))
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError([f"spec: cannot read the file ({exc.strerror or exc})"], str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"spec: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})"], str(path)) from None
    try:
        check_shape(text)
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise SpecError([f"spec: {str(exc)[:500]}"], str(path)) from None
    except SpecError as exc:
        raise SpecError(exc.errors, str(path)) from None


def check_shape(text: str) -> None:
    """Depth and expanded size of a YAML document, from its event stream (no recursion, no
    expansion): SpecError past MAX_DEPTH levels or MAX_NODES values."""
    depth, anchors, stack = 0, {}, []
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError([f"spec: nested deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1})"])
            stack.append([event.anchor, 1])
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
            anchor, size = stack.pop()
            _add(stack, anchors, anchor, size, event)
            continue
        if isinstance(event, yaml.AliasEvent):
            _add(stack, anchors, None, anchors.get(event.anchor, 1), event)
        elif isinstance(event, yaml.ScalarEvent):
            _add(stack, anchors, event.anchor, 1, event)


def _add(stack: list, anchors: dict, anchor, size: int, event) -> None:
    """Count a finished value of `size` expanded nodes into its parent; remember anchored ones."""
    if anchor:
        anchors[anchor] = size
    if stack:
        stack[-1][1] += size
        if stack[-1][1] > MAX_NODES or size > MAX_NODES:
            raise SpecError([f"spec: expands to more than {MAX_NODES:,} values (YAML aliases included; "
                             f"line {event.start_mark.line + 1})"])


def _resolve(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if str(source) in list_presets():
        return preset_path(str(source))
    raise SpecError([f"spec: no file {str(source)!r} and no preset of that name; {suggest(source, list_presets())}"])
