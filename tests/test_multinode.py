"""Multi-node: a two-node ray.cluster_utils.Cluster with shared (local) storage; trials spread over
both nodes, and storage a node cannot see is refused before any trial runs.

The cluster needs a driver of its own, so the search runs in a subprocess (this file as a
script) and never meets the test session's Ray.
"""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_trials_spread_over_nodes_and_unshared_storage_is_refused(tmp_path):
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["statuses"] == ["ok"] * 6
    assert set(out["trial_nodes"]) == set(out["cluster_nodes"]) and len(out["cluster_nodes"]) == 2
    assert out["refused"].startswith("invalid search spec") and "storage: " in out["refused"]
    assert out["blind_node"] in out["refused"] and "NFS mount or s3://" in out["refused"]
    assert not out["blind_experiment_started"]


def _main(storage: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from ranksearch.orchestrator import connect, run_search
    from ranksearch.search_spaces import SpecError

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head_node": 1}, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, resources={"worker_node": 1})
    spec = {
        "name": "multinode", "models": ["mlp"], "dataset": "digits", "dataset_options": {"max_train": 300},
        "formats": ["tt"], "methods": {"fixed": {}}, "budgets": [0.2],
        "train": {"epochs": 1, "finetune_epochs": 0, "max_rank": 4}, "search": {"seeds": list(range(6))},
    }
    try:
        result = run_search(spec, storage_path=storage, name="spread", address=cluster.address)
        ray.init(address=cluster.address)
        cluster_nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        ray.shutdown()

        connect.probe = lambda path, node_ids: [node != worker.node_id for node in node_ids]  # the worker is blind
        try:
            run_search(spec, storage_path=storage, name="blind", address=cluster.address)
            refused = ""
        except SpecError as exc:
            refused = str(exc)
        print(json.dumps({
            "statuses": [r["status"] for r in result.records],
            "trial_nodes": sorted({r["node_id"] for r in result.records}),
            "cluster_nodes": cluster_nodes,
            "refused": refused, "blind_node": worker.node_id[:12],
            "blind_experiment_started": os.path.exists(os.path.join(storage, "blind", "spec.json")),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _main(sys.argv[1])
