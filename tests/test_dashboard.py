"""The Grafana dashboard: every panel queries metrics ranksearch exports, and every export is shown."""

from __future__ import annotations

import json
import re

from ranksearch.orchestrator import dashboard
from ranksearch.orchestrator.metrics import METRICS

NAME = re.compile(r"\bray_(ranksearch_\w+)")
SELECTOR = re.compile(r"\bray_(ranksearch_\w+)\{([^}]*)\}")


def load() -> dict:
    return json.loads(dashboard.SOURCE.read_text())


def test_every_panel_queries_an_exported_metric():
    board = load()
    panels = board["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    queried = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(NAME.findall(target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= set(METRICS), (panel["title"], names - set(METRICS))
            # every label a selector filters on is one its metric carries; grouping labels, one of them
            for name, selector in SELECTOR.findall(target["expr"]):
                filtered = set(re.findall(r"(\w+)\s*[=!]~?", selector))
                assert filtered <= set(METRICS[name][1]), (panel["title"], name, filtered)
            grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", target["expr"])
                       for label in group.split(",")}
            assert grouped <= {tag for name in names for tag in METRICS[name][1]}, (panel["title"], grouped)
            queried |= names
    assert queried == set(METRICS)  # and nothing ranksearch exports is left off the dashboard
    variable = next(v for v in board["templating"]["list"] if v["name"] == "search")
    assert set(NAME.findall(variable["query"]["query"])) <= set(METRICS)


def test_grafana_layout_fields():
    board = load()
    assert board["uid"] == "ranksearch" and board["title"]
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"] == "${datasource}"  # the Prometheus data source Ray provisions


def test_install_next_to_rays_dashboards(tmp_path, monkeypatch):
    assert dashboard.install_dashboard(tmp_path / "mine") == str(tmp_path / "mine" / dashboard.FILE_NAME)
    assert json.loads((tmp_path / "mine" / dashboard.FILE_NAME).read_text()) == load()
    monkeypatch.setenv(dashboard.OUTPUT_DIR_ENV, str(tmp_path / "absent"))
    assert dashboard.install_dashboard() is None  # Ray made no dashboards there: nothing to sit beside
    (tmp_path / "absent").mkdir()
    assert dashboard.install_dashboard() == str(tmp_path / "absent" / dashboard.FILE_NAME)
