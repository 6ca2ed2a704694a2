"""ranksearch's Grafana dashboard (dashboards/ranksearch.json), put where Ray's own are.

Ray's dashboard head writes its generated Grafana dashboards to
`<session dir>/metrics/grafana/dashboards` (or $RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR),
the folder the Grafana provisioning file it writes next to them points at; Grafana loads
every JSON file there into its "Ray" folder. The metrics actor (metrics.py) copies ours
there when it starts on the head node, so `ray metrics launch-prometheus` plus a Grafana
started with Ray's `grafana.ini` shows it beside Ray's. For a Grafana of your own:

    python -m ranksearch.orchestrator.dashboard DIR     # writes DIR/ranksearch_grafana_dashboard.json
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("dashboards") / "ranksearch.json"
FILE_NAME = "ranksearch_grafana_dashboard.json"  # Ray names its own <name>_grafana_dashboard.json
OUTPUT_DIR_ENV = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"


def ray_dashboard_dir() -> Path | None:
    """Where this node's Ray keeps its generated Grafana dashboards; None if it made none."""
    if os.environ.get(OUTPUT_DIR_ENV):
        folder = Path(os.environ[OUTPUT_DIR_ENV])
    else:
        try:  # private API (pinned ray 2.60): the session directory of the node this process runs on
            import ray

            node = ray._private.worker.global_worker.node
            folder = Path(node.get_session_dir_path(), "metrics", "grafana", "dashboards")
        except Exception:
            return None
    return folder if folder.is_dir() else None


def install_dashboard(folder=None) -> str | None:
    """Copy the dashboard into `folder` (default: next to Ray's); the path written, or None."""
    folder = Path(folder) if folder is not None else ray_dashboard_dir()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / FILE_NAME
    tmp = target.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
    shutil.copyfile(SOURCE, tmp)
    os.replace(tmp, target)
    return str(target)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ranksearch.orchestrator.dashboard DIR")
    print(install_dashboard(sys.argv[1]))
