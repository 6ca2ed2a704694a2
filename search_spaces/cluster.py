"""Offline validation of a Ray cluster-launcher YAML with Ray's own validator.

`ray up` fills in the provider's defaults (`prepare_config`) and checks the result
against Ray's JSON schema (`validate_config`) before touching the cloud; both steps
read only files shipped with Ray, so they run without credentials. They are private
Ray API (pinned: ray 2.60), hence the wrapper: if Ray moves them, this says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml


class ClusterConfigError(ValueError):
    """A cluster-launcher config that Ray would refuse."""


def validate_cluster_config(path: str | os.PathLike) -> dict:
    """The config as `ray up` would use it (defaults filled); ClusterConfigError if Ray rejects it."""
    try:
        import jsonschema
        from click import ClickException
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:
        raise RuntimeError(
            "Ray's cluster-config validator (ray.autoscaler._private.util.prepare_config/validate_config) "
            f"could not be imported ({exc}); it is private API: pin ray==2.60.0 or update {__name__}"
        ) from exc
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ClusterConfigError(f"{path}: expected a mapping, got {type(config).__name__}")
    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        field = ".".join(map(str, exc.absolute_path)) or "(top level)"
        raise ClusterConfigError(f"{path}: {field}: {exc.message}") from None
    except KeyError as exc:
        raise ClusterConfigError(f"{path}: missing required key {exc}") from None
    except (ValueError, RuntimeError, ClickException) as exc:
        # Ray reports config problems outside the schema with these (missing keys, a
        # local provider without head_ip, min_workers above max_workers, ...).
        raise ClusterConfigError(f"{path}: {exc}") from None
    return prepared
