"""Search metrics scraped from a real `ray start --head` cluster's /metrics endpoint while a search
runs and after its driver has exited; the local Ray ranksearch starts listens on loopback only."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bench._ray_head import ray_head
from conftest import REPO
from ranksearch.orchestrator.metrics import METRICS
from ranksearch.orchestrator.pareto import hypervolume

SAMPLE = re.compile(r'^ray_(ranksearch_\w+)\{(.*)\} (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int, search: str) -> dict:
    """{(metric, frozenset of its ranksearch tags): value} for one search, from Prometheus text."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if m := SAMPLE.match(line):
            name, labels, value = m.groups()
            tags = dict(LABEL.findall(labels))
            if tags.get("search") == search and name in METRICS:
                keys = METRICS[name][1]
                out[name, frozenset((k, tags[k]) for k in keys if k != "search")] = float(value)
    return out


def value(sample: dict, name: str, **tags) -> float | None:
    return sample.get((name, frozenset(tags.items())))


@pytest.fixture
def head(tmp_path):
    """`ray start --head` on loopback, its own ports and temp dir, exporting metrics every second."""
    with ray_head(tmp_path / "head.log") as info:
        yield info


def test_metrics_during_and_after_a_search_on_a_ray_start_cluster(head, tmp_path, tiny_spec):
    spec = tiny_spec(name="watched", budgets=[0.1, 0.2, 0.3], search={"max_concurrent": 1})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    driver = subprocess.Popen(
        [sys.executable, "-m", "ranksearch.orchestrator.cli", "run", str(tmp_path / "spec.yaml"),
         "--address", head["address"], "--storage", str(tmp_path / "runs"), "--name", "watched"],
        cwd=REPO, env=head["env"], stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    seen = []
    while driver.poll() is None:
        sample = scrape(head["metrics"], "watched")
        progress = tuple(value(sample, "ranksearch_trials", method="fixed", status=s) for s in ("ok", "running", "pending"))
        if progress[0] is not None and (not seen or seen[-1] != progress):
            seen.append(progress)
        time.sleep(0.2)
    assert driver.returncode == 0, (tmp_path / "driver.log").read_text()
    # While it ran: one trial running, the others pending or done (trials after the first are too
    # quick here for every step to show within a 1 s report interval), then all 3 ok.
    assert any(ok < 3 and running == 1 and ok + running + pending == 3 for ok, running, pending in seen), seen
    assert seen[-1] == (3, 0, 0), seen

    trials = pd.read_parquet(tmp_path / "runs" / "watched" / "report" / "trials.parquet")
    expected_hv = hypervolume(list(zip(trials.accuracy, trials.params / trials.dense_params)), [0.0, 1.0], ["max", "min"])
    # A gauge set once leaves /metrics ~5 s later (2 report intervals + export lag): still there at 12 s.
    for wait in (3.0, 9.0):
        time.sleep(wait)
        after = scrape(head["metrics"], "watched")  # the driver has exited: the actor holds them
        assert value(after, "ranksearch_trials", method="fixed", status="ok") == 3, after
        assert value(after, "ranksearch_trials", method="fixed", status="pending") == 0
        assert value(after, "ranksearch_trials", method="fixed", status="running") == 0
        assert value(after, "ranksearch_trials_total", method="fixed") == 3
        assert value(after, "ranksearch_search_running") == 0
        assert value(after, "ranksearch_best", method="fixed", metric="accuracy") == pytest.approx(trials.accuracy.max())
        for row in trials.itertuples():
            best = trials[trials.budget == row.budget].accuracy.max()
            assert value(after, "ranksearch_best_by_budget", budget=f"{row.budget:g}", metric="accuracy") == pytest.approx(best)
        assert value(after, "ranksearch_hypervolume", method="fixed") == pytest.approx(expected_hv)
    # ranksearch's Grafana dashboard sits next to the ones Ray generated for this cluster.
    dashboards = Path(head["temp_dir"], "session_latest", "metrics", "grafana", "dashboards")
    assert (dashboards / "default_grafana_dashboard.json").is_file()
    assert json.loads((dashboards / "ranksearch_grafana_dashboard.json").read_text())["uid"] == "ranksearch"
    # The dashboard names the driver's job after the search; the actor's log shows the progress.
    jobs = json.loads(urllib.request.urlopen(f"{head['dashboard']}/api/jobs/", timeout=10).read())
    assert [j["metadata"].get("job_name") for j in jobs if j.get("driver_info")] == ["ranksearch:watched"]
    actors = json.loads(urllib.request.urlopen(f"{head['dashboard']}/api/v0/actors?detail=1&limit=100", timeout=10)
                        .read())["data"]["result"]["result"]
    # class names as Ray shows them: Tune's trial actor is "ImplicitFunc" or, on some runs of the same
    # Ray version, its qualified "wrap_function.<locals>.ImplicitFunc"
    names = {(a["class_name"].rsplit(".", 1)[-1], a.get("name") or a.get("repr_name")) for a in actors}
    assert ("MetricsHolder", "ranksearch:metrics") in names and ("ImplicitFunc", "ranksearch:watched") in names, names
    logs = Path(head["temp_dir"], "session_latest", "logs")
    actor_out = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.out"))
    assert "watched: 3 of 3 done (ok 3) | best accuracy:" in actor_out


PROBE = """
import json, socket, sys, urllib.request
import ray
from ranksearch.orchestrator.connect import connect
from ranksearch.search_spaces import load_spec

def answers(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False

assert connect(load_spec(json.loads(sys.argv[1])), None)
node = ray._private.worker._global_node
ports = {"metrics": node.metrics_export_port, "gcs": int(node.gcs_address.rsplit(":", 1)[1]),
         "dashboard": int(ray._private.worker.get_dashboard_url().rsplit(":", 1)[1])}
urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).read()
print(json.dumps({"node_ip": node.node_ip_address, "interval_ms": ray._config.metrics_report_interval_ms(),
                  "outside": {k: answers(sys.argv[2], p) for k, p in ports.items()},
                  "loopback": {k: answers("127.0.0.1", p) for k, p in ports.items()}}))
ray.shutdown()
"""


def this_hosts_address() -> str | None:
    """The address other machines reach this one at (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only a route is looked up
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_local_ray_listens_on_loopback_only_and_reports_every_second(tiny_spec):
    outside = this_hosts_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback address to probe from")
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(tiny_spec()), outside], capture_output=True,
                          text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["node_ip"] == "127.0.0.1" and seen["interval_ms"] == 1000
    assert all(seen["loopback"].values()), seen
    assert not any(seen["outside"].values()), seen  # /metrics, GCS and dashboard: nothing on other interfaces


def test_values_count_trials_finished_before_a_resume():
    """A resumed search runs only the trials without a record: the others still count, from their records."""
    from types import SimpleNamespace

    from ranksearch.orchestrator.metrics import SearchMetrics, progress_line

    objectives = [{"metric": "accuracy", "mode": "max"}, {"metric": "params", "mode": "min"}]
    before = {0: {"status": "ok", "method": "l0", "budget": 0.1, "accuracy": 0.9, "params": 10, "dense_params": 100}}
    metrics = SearchMetrics("s", ("l0", "l0", "lwiq", "lwiq"), objectives, before)
    running = SimpleNamespace(config={"slot": 1}, status="RUNNING", last_result={})
    failed = SimpleNamespace(config={"slot": 2}, status="ERROR", last_result={})
    got = {(name, tuple(sorted(tags.items()))): v for name, tags, v in metrics.values([running, failed])}
    trials = {(t["method"], t["status"]): v for (name, tags), v in got.items() if name == "ranksearch_trials"
              for t in [dict(tags)]}
    assert trials[("l0", "ok")] == 1 and trials[("l0", "running")] == 1
    assert trials[("lwiq", "failed")] == 1 and trials[("lwiq", "pending")] == 1
    assert sum(trials.values()) == 4
    assert got[("ranksearch_best", (("method", "l0"), ("metric", "accuracy")))] == 0.9
    assert got[("ranksearch_best_by_budget", (("budget", "0.1"), ("metric", "accuracy")))] == 0.9
    assert got[("ranksearch_hypervolume", (("method", "l0"),))] == pytest.approx(0.9 * 0.9)
    assert progress_line("s", metrics.values([running, failed])).startswith(
        "s: 2 of 4 done (ok 1, failed 1, running 1, pending 1) | best accuracy: l0 0.9000")
