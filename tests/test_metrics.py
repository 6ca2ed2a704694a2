"""Search metrics scraped from a real `ray start --head` cluster's /metrics endpoint while a search
runs and after its driver has exited; the local Ray ranksearch starts listens on loopback only."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO
from ranksearch.orchestrator.metrics import METRICS
from ranksearch.orchestrator.pareto import hypervolume

SAMPLE = re.compile(r'^ray_(ranksearch_\w+)\{(.*)\} (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


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
    gcs, dash, client, agent, grpc, metrics, env_agent, nm, om = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp")  # short: Ray puts Unix sockets in it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(  # this interpreter's Ray (the `ray` script may belong to another environment)
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=1", f"--port={gcs}",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
         f"--node-manager-port={nm}", f"--object-manager-port={om}",
         "--system-config=" + json.dumps({"metrics_report_interval_ms": 1000})],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
                time.sleep(0.5)
        yield {"address": f"127.0.0.1:{gcs}", "metrics": metrics, "env": env, "temp_dir": temp_dir,
               "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
    time.sleep(3.5)  # past the metrics agent's expiry (2 report intervals) of a series nobody re-exports
    for _ in range(2):
        after = scrape(head["metrics"], "watched")  # the driver has exited: the actor holds them
        assert value(after, "ranksearch_trials", method="fixed", status="ok") == 3
        assert value(after, "ranksearch_trials", method="fixed", status="pending") == 0
        assert value(after, "ranksearch_trials", method="fixed", status="running") == 0
        assert value(after, "ranksearch_trials_total", method="fixed") == 3
        assert value(after, "ranksearch_search_running") == 0
        assert value(after, "ranksearch_best", method="fixed", metric="accuracy") == pytest.approx(trials.accuracy.max())
        for row in trials.itertuples():
            best = trials[trials.budget == row.budget].accuracy.max()
            assert value(after, "ranksearch_best_by_budget", budget=f"{row.budget:g}", metric="accuracy") == pytest.approx(best)
        assert value(after, "ranksearch_hypervolume", method="fixed") == pytest.approx(expected_hv)
        time.sleep(1.5)
    # ranksearch's Grafana dashboard sits next to the ones Ray generated for this cluster.
    dashboards = Path(head["temp_dir"], "session_latest", "metrics", "grafana", "dashboards")
    assert (dashboards / "default_grafana_dashboard.json").is_file()
    assert json.loads((dashboards / "ranksearch_grafana_dashboard.json").read_text())["uid"] == "ranksearch"
    # The dashboard names the driver's job after the search; the actor's log shows the progress.
    jobs = json.loads(urllib.request.urlopen(f"{head['dashboard']}/api/jobs/", timeout=10).read())
    assert [j["metadata"].get("job_name") for j in jobs if j.get("driver_info")] == ["ranksearch:watched"]
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
