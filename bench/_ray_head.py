"""A throwaway `ray start --head` on loopback, for bench/watch.py and the tests (metrics, job
submission with token auth).

Every port is its own (so several can run on one machine), its session files stay in a temp
dir of its own, and it is stopped by signalling the one process started here (`ray stop`
would stop every Ray on the machine). Ray is started with this interpreter (`python -m
ray.scripts.scripts`): a `ray` script on PATH may belong to another environment, and its
workers would then import another copy of ranksearch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def ray_head(log_path, *, num_cpus: int = 1, report_ms: int = 1000, timeout_s: float = 120,
             auth_token: str | None = None):
    """Yields {"address", "metrics", "dashboard", "env", "temp_dir"}; token auth only with `auth_token`.

    This interpreter's folder leads PATH, so a job's `python` entrypoint is this environment's."""
    gcs, dash, client, agent, grpc, metrics, env_agent, nm, om = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp")  # short: Ray puts Unix sockets in it
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token} if auth_token else {"RAY_AUTH_MODE": "disabled"}
    env = {**os.environ, **auth, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
         f"--num-cpus={num_cpus}", f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
         "--system-config=" + json.dumps({"metrics_report_interval_ms": report_ms})],
        env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        for url in (f"http://127.0.0.1:{metrics}/metrics", f"http://127.0.0.1:{dash}/api/version"):
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except urllib.error.HTTPError:  # 401 with token auth: up, and it wants the token
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"ray start --head did not come up:\n{Path(log_path).read_text()}")
                    time.sleep(0.5)
        yield {"address": f"127.0.0.1:{gcs}", "metrics": metrics, "dashboard": f"http://127.0.0.1:{dash}",
               "env": env, "temp_dir": temp_dir}
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
