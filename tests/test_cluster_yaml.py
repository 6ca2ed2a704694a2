"""cluster.yaml passes Ray's own cluster-launcher validator (offline), and broken copies fail it."""

import sys
from pathlib import Path

import pytest
import yaml

from ranksearch.search_spaces.cluster import ClusterConfigError, validate_cluster_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
ONPREM_MARKER = "# ---- "


@pytest.fixture(scope="module")
def prepared():
    return validate_cluster_config(CLUSTER_YAML)


def test_cluster_yaml_passes_rays_validator(prepared):
    assert prepared["provider"]["type"] == "aws"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "trials must not land on the head"
    workers = [t for name, t in prepared["available_node_types"].items() if name != prepared["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 and t["min_workers"] == 0 for t in workers)


def test_nodes_install_the_project_like_make(prepared):
    assert prepared["file_mounts"]["~/ranksearch"] == "."
    assert any("cd ~/ranksearch && RANKSEARCH_DEVICE=cuda make install" in c for c in prepared["setup_commands"])


def test_ray_starts_with_token_auth_and_a_private_dashboard(prepared):
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        (start,) = [c for c in commands if "ray start" in c]
        assert "export RAY_AUTH_MODE=token" in start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def onprem_variant(text: str) -> str:
    """The commented-out local-provider config at the bottom of cluster.yaml, uncommented."""
    tail = text[text.index(ONPREM_MARKER) :].splitlines()
    return "\n".join(line[2:] for line in tail if line.startswith("# ") and not line.startswith(ONPREM_MARKER))


def test_commented_onprem_variant_passes_too(tmp_path):
    path = tmp_path / "onprem.yaml"
    path.write_text(onprem_variant(CLUSTER_YAML.read_text()))
    prepared = validate_cluster_config(path)
    assert prepared["provider"]["type"] == "local" and prepared["provider"]["worker_ips"]


def _unknown_key(config):
    config["max_worker"] = 3


def _negative_max_workers(config):
    config["max_workers"] = -1


def _min_above_max(config):
    config["available_node_types"]["gpu-1x"]["min_workers"] = config["max_workers"] + 1


def _no_provider(config):
    del config["provider"]


BROKEN = {
    "unknown top-level key": (_unknown_key, "'max_worker' was unexpected"),
    "max_workers -1": (_negative_max_workers, "max_workers: -1 is less than the minimum of 0"),
    "min_workers above max_workers": (_min_above_max, "smaller than the sum of `min_workers`"),
    "no provider": (_no_provider, "missing required key 'provider'"),
}


@pytest.mark.parametrize("breaks, message", BROKEN.values(), ids=BROKEN.keys())
def test_broken_copies_fail_validation(tmp_path, breaks, message):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    breaks(config)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ClusterConfigError, match="cluster.yaml: ") as info:
        validate_cluster_config(path)
    assert message in str(info.value)


def test_a_moved_ray_api_is_reported_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.autoscaler._private.util", None)
    with pytest.raises(RuntimeError, match="private API: pin ray"):
        validate_cluster_config(CLUSTER_YAML)
