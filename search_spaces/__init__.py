"""Search specs: the schema with defaults and validation, and the bundled presets.

    from ranksearch.search_spaces import load_spec
    spec = load_spec("digits-quick")      # preset name, YAML path or dict
    spec.cells(); spec.method_params("l0"); spec.check_resources(ray.cluster_resources())
"""

from .errors import SpecError
from .loading import list_presets, load_spec, preset_path
from .spec import Spec
from .values import DISTRIBUTIONS, is_distribution

__all__ = ["DISTRIBUTIONS", "Spec", "SpecError", "is_distribution", "list_presets", "load_spec", "preset_path"]
