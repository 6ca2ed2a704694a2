"""report/index.html: parsed back (rows = trials, front members marked as in pareto.parquet), and
rewritten live during a real search on the session's local Ray."""

from __future__ import annotations

import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd

from ranksearch.orchestrator import run_search
from ranksearch.orchestrator.report import load_reports, render_page, write_reports
from test_report import synthetic_records


class Page(HTMLParser):
    """The facts a reader takes from the page: trial rows, method rows, plots, progress, links."""

    def __init__(self, text: str):
        super().__init__()
        self.trials, self.methods, self.svgs, self.urls, self.progress, self.refresh = {}, {}, [], [], None, False
        self._row, self._table = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and "data-trial" in a:
            self._row = self.trials[a["data-trial"]] = {"status": a["data-status"], "classes": a.get("class", ""),
                                                        "front": (a.get("data-front") or "").split(), "cells": []}
        elif tag == "tr" and "data-method" in a:
            self._row = self.methods[a["data-method"]] = {"cells": []}
        elif tag == "td" and self._row is not None:
            self._row["cells"].append("")
        elif tag == "svg":
            self.svgs.append(a.get("data-model"))
        elif tag == "p" and a.get("id") == "progress":
            self.progress = (int(a["data-done"]), int(a["data-total"]))
        elif tag == "meta" and a.get("http-equiv") == "refresh":
            self.refresh = True
        for name in ("src", "href"):
            if name in a:
                self.urls.append(a[name])

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None and self._row["cells"]:
            self._row["cells"][-1] += data


def test_final_page_rows_are_the_trials_and_fronts_are_marked(tmp_path):
    records = synthetic_records()
    paths = write_reports(records, tmp_path / "exp" / "report")
    page = Page(paths.page.read_text())
    trials, pareto = (load_reports(paths.report_dir)[k] for k in ("trials", "pareto"))
    assert set(page.trials) == set(trials.trial_id) and len(page.trials) == len(records)
    for row in trials.itertuples():
        assert page.trials[row.trial_id]["status"] == row.status
    expected = pareto.groupby("trial_id")["group"].apply(set).to_dict()
    marked = {tid: set(r["front"]) for tid, r in page.trials.items() if "front" in r["classes"]}
    assert marked == expected and marked  # every front member, in every group it belongs to, and nothing else
    overall = set(pareto[pareto.group == "overall"].trial_id)
    assert {tid for tid, r in page.trials.items() if r["cells"][1] == "★"} == overall
    assert sorted(page.svgs) == sorted(trials[trials.status == "ok"].model.unique())
    assert page.progress == (len(records), len(records)) and not page.refresh
    assert not page.urls  # self-contained: nothing loaded from anywhere
    failed = trials[trials.status == "failed"].trial_id.iloc[0]
    assert "diverged" in page.trials[failed]["cells"][-1]
    hp = page.trials["t002"]["cells"][7]
    assert "max_rank=16" in hp and "epochs" not in hp  # what varies between trials; the rest is in the tooltip
    assert "exp" in paths.page.read_text().split("<title>")[1].split("</title>")[0]
    bayes = page.methods["bayesian"]["cells"]
    assert bayes[0] == "bayesian" and int(bayes[-3]) == sum(r["method"] == "bayesian" for r in records)


def test_live_page_lists_unfinished_trials_and_reloads(tmp_path):
    records = synthetic_records(n=8)
    unfinished = [{"trial_id": "run-1", "status": "running", "model": "mlp", "method": "l0", "format": "tt",
                   "budget": 0.1, "budget_params": None},
                  {"trial_id": "wait-1", "status": "pending", "model": "mlp", "method": "l0", "format": "tt",
                   "budget": None, "budget_params": 5000}]
    page = Page(render_page(records, title="live", unfinished=unfinished))
    assert page.refresh and page.progress == (len(records), len(records) + 2)
    assert page.trials["run-1"]["status"] == "running" and page.trials["wait-1"]["status"] == "pending"
    assert page.trials["wait-1"]["cells"][6] == "p5000" and "front" not in page.trials["run-1"]["classes"]
    l0 = page.methods["l0"]["cells"]
    assert l0[5:7] == ["1", "1"]  # running, pending


def test_page_is_rewritten_after_every_trial_of_a_real_search(ray_session, tmp_path, tiny_spec):
    """Poll the page while a 3-trial search runs one trial at a time: it exists from the start, shows
    each finished trial before the search ends, and is the final report at the end."""
    spec = tiny_spec(budgets=[0.1, 0.2, 0.3], search={"max_concurrent": 1})
    page_path = Path(tmp_path, "live", "report", "index.html")
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            if page_path.exists():
                page = Page(page_path.read_text())  # never a half page: the file is replaced whole
                if page.progress is None or not page.trials:
                    seen.append("half a page")
                elif not seen or seen[-1] != page.progress:
                    seen.append(page.progress)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_search(spec, storage_path=tmp_path, name="live")
    finally:
        done.set()
        watcher.join(timeout=10)
    assert seen and "half a page" not in seen and seen[0][1] == 3
    assert (1, 3) in seen and (2, 3) in seen, seen  # after the first trial, while the others had not run
    final = Page(page_path.read_text())
    trials = pd.read_parquet(result.report_dir / "trials.parquet")
    assert final.progress == (3, 3) and not final.refresh
    assert {tid: r["status"] for tid, r in final.trials.items()} == dict(zip(trials.trial_id, trials.status))
    assert all("front" in final.trials[tid]["classes"] for tid in load_reports(result.report_dir)["pareto"].trial_id)
