"""Where a search runs: join or start Ray, and refuse what could never run there.

- A trial's resources are checked against the machine before a local Ray starts, or
  against what a cluster offers or its autoscaler can grow to: Tune would otherwise
  leave a trial that cannot fit pending forever.
- Storage rule: a search is multi-node when Ray reports more than one alive node. Its
  storage must then be reachable from every node: an object-store URI (s3://, gs://, ...)
  is taken as shared; a path is checked by writing a probe file from the driver and
  looking for it from a zero-CPU task pinned to each node, so an NFS mount passes and a
  node-local directory fails, naming the nodes. Nodes an autoscaler adds later cannot be
  probed: a local path then gets a warning, and Ray's own storage check fails the trials
  that land on a node without it.
- The local Ray ranksearch starts listens on 127.0.0.1 only (_bind_local_ray) and exports
  metrics every second (METRICS_REPORT_MS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
import warnings
from pathlib import Path

from ranksearch.search_spaces import Spec, SpecError

from .records import is_uri

HOST_ENV = "RANKSEARCH_RAY_HOST"  # where the local Ray listens: 127.0.0.1 (default), or e.g. 0.0.0.0 / this host's IP
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's processes take loopback as the node address
METRICS_REPORT_MS = 1000  # how often Ray exports metric values (its default, 10 s, hides a trial's end)


def connect(spec: Spec, address: str | None, job_name: str | None = None) -> bool:
    """Use the Ray this process already joined, a cluster (`address`, else $RAY_ADDRESS, which a Ray
    job's driver has), or a new local Ray sized to this machine; check that a trial fits. True if
    connected here (then the caller shuts down). `job_name` names the driver's job in the Ray
    dashboard (its Jobs table shows the `job_name` metadata key; a submitted job keeps the name
    it was submitted with)."""
    import ray
    from ray.job_config import JobConfig

    started = not ray.is_initialized()
    if started:
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False,
                 "job_config": JobConfig(metadata={"job_name": job_name} if job_name else None)}
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            _check_reachable(address)
            try:
                ray.init(address=address, **quiet)
            except ConnectionError as exc:
                raise ValueError(f"--address: no Ray cluster at {address!r}: {exc}") from None
        else:
            cpus, gpus = os.cpu_count() or 1, _local_gpus()
            spec.check_resources({"CPU": cpus, "GPU": gpus})  # before Ray starts: nothing to clean up
            # address="local": a new Ray even when a `ray start` cluster on this machine would be found
            with _bind_local_ray() as host:
                ray.init(address="local", num_cpus=cpus, num_gpus=gpus, dashboard_host=host,
                         _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS}, **quiet)
    try:
        spec.check_resources(cluster_capacity())  # a trial that can never fit would wait forever
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started


@contextlib.contextmanager
def _bind_local_ray():
    """While the local Ray starts: its node address is 127.0.0.1 unless $RANKSEARCH_RAY_HOST says
    otherwise, so the dashboard, its metrics endpoints (the node's /metrics, the dashboard's and
    the autoscaler's, which answer without a token) and the gRPC services listen on loopback only.

    Ray takes the node address from services.get_node_ip_address(), which answers loopback only
    when ray_constants.ENABLE_RAY_CLUSTER is off (its default on macOS and Windows): set here
    for the start only (private API, pinned ray 2.60), with the same setting in the environment
    the Ray processes inherit. Yields the dashboard host."""
    host = os.environ.get(HOST_ENV, "127.0.0.1")
    if host not in ("127.0.0.1", "localhost"):
        yield host
        return
    from ray._private import ray_constants

    saved, saved_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[LOOPBACK_ENV] = "0"
    try:
        yield "127.0.0.1"
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


def _check_reachable(address: str) -> None:
    """Fail fast on HOST:PORT nobody listens on: ray.init would retry for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and friends: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise ValueError(f"--address: nothing answers at {address!r} ({exc})") from None


def _local_gpus() -> int:
    import torch  # already imported by the spec's model tables

    return torch.cuda.device_count()


def cluster_capacity() -> dict:
    """What the cluster offers now, or what its autoscaler can grow to if that is more."""
    import ray

    capacity = dict(ray.cluster_resources())
    try:  # private API (pinned ray 2.60), the one Ray Train uses for the same question
        from ray._private.state import state

        grow_to = state.get_max_resources_from_cluster_config() or {}
    except Exception:
        grow_to = {}
    return {k: max(capacity.get(k, 0), grow_to.get(k, 0)) for k in {*capacity, *grow_to}}


def check_shared_storage(storage: str) -> None:
    """SpecError naming the nodes that cannot see a multi-node search's storage (the rule above)."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if is_uri(storage):
        return
    if len(nodes) < 2:
        if cluster_capacity() != dict(ray.cluster_resources()):
            warnings.warn(f"storage {storage!r} is a local path and the cluster can add nodes: "
                          "make sure every node mounts it (NFS), or use s3:// / gs://", stacklevel=3)
        return
    os.makedirs(storage, exist_ok=True)
    marker = Path(storage, f".ranksearch-probe-{uuid.uuid4().hex}")
    marker.touch()
    try:
        seen = probe(str(marker), [n["NodeID"] for n in nodes])
    finally:
        marker.unlink()
    blind = [f"{n['NodeManagerAddress']} (node {n['NodeID'][:12]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise SpecError([
            f"storage: {storage!r} is not visible from node(s) {', '.join(blind)}: a multi-node search needs "
            "storage every node shares, an NFS mount or s3:// / gs:// (spec `storage:` or --storage)"
        ])


def probe(path: str, node_ids: list[str]) -> list[bool]:
    """Whether `path` exists, seen from each node (a zero-CPU task pinned to it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    exists = ray.remote(num_cpus=0)(os.path.exists)
    pinned = [exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
              for node in node_ids]
    return ray.get([task.remote(path) for task in pinned], timeout=120)
