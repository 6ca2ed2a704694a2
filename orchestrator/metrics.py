"""Search metrics that outlive the driver: a detached named Ray actor holds the gauges.

Ray exports a ray.util.metrics gauge only while the process that set it lives, and its
metrics agent forgets a series two report intervals after the last export (20 s by
default). Gauges set by the driver therefore vanished ~20 s after a search ended, even on a
`ray start` cluster. Here the driver's Tune callback (SearchMetrics) sends each new set of
values to one detached actor per cluster, `ranksearch:metrics` in namespace `ranksearch`
(0 CPUs, placed on the head node when it can be), which sets the gauges and keeps every
search's last values for as long as the cluster runs (`ray stop` ends it; on the local Ray a
search starts for itself, it ends with the search).

Every node's metrics agent serves them at http://<node>:<metrics export port>/metrics,
prefixed `ray_` (METRICS below, with their tags). Values change when a trial starts or ends
and reach the endpoint within one report interval (ranksearch's own local Ray: 1 s; a
cluster: its `metrics_report_interval_ms`, 10 s unless set at `ray start`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict

from ray import tune

from .pareto import hypervolume
from .progress import BOUNDED, budget_label, trial_status

ACTOR_NAME, NAMESPACE = "ranksearch:metrics", "ranksearch"
STATUSES = ("ok", "failed", "stopped", "running", "pending")
FINISHED = STATUSES[:3]

# name -> (description, tag keys): the one list of what ranksearch exports (the dashboard test reads it).
METRICS = {
    "ranksearch_trials": ("trials per method and status (ok, failed, stopped, running, pending)",
                          ("search", "method", "status")),
    "ranksearch_trials_total": ("planned trials per method", ("search", "method")),
    "ranksearch_best": ("best value of the primary objective per method", ("search", "method", "metric")),
    "ranksearch_best_by_budget": ("best value of the primary objective per budget", ("search", "budget", "metric")),
    "ranksearch_hypervolume": ("hypervolume of each method's (metric, params/dense_params) front, reference (0, 1)",
                               ("search", "method")),
    "ranksearch_search_running": ("1 while the search's driver runs, 0 once it ended", ("search",)),
    "ranksearch_last_update_timestamp_seconds": ("unix time of the search's last update", ("search",)),
}

log = logging.getLogger(__name__)


class MetricsHolder:
    """The detached actor: sets the gauges and keeps the last values per search."""

    def __init__(self):
        from .dashboard import install_dashboard

        self._gauges, self._values = {}, {}  # _values: search -> {(name, sorted tag items): value}
        self.dashboard_path = install_dashboard()

    def _gauge(self, name: str, tag_keys: tuple):
        """Made on first use, so a driver newer than this actor can add a metric."""
        if name not in self._gauges:
            from ray.util.metrics import Gauge

            text, tag_keys = METRICS.get(name, (name, tag_keys))
            self._gauges[name] = Gauge(name, text, tag_keys=tag_keys)
        return self._gauges[name]

    def update(self, search: str, values: list[tuple[str, dict, float]]) -> int:
        """Set every (metric, tags, value); tags get `search`. Returns how many were set."""
        kept = self._values.setdefault(search, {})
        for name, tags, value in values:
            tags = {"search": search, **tags}
            self._gauge(name, tuple(tags)).set(float(value), tags=tags)
            kept[(name, tuple(sorted(tags.items())))] = float(value)
        print(progress_line(search, values), flush=True)  # the actor's log: the search's progress in the dashboard
        return len(values)

    def snapshot(self, search: str | None = None) -> dict:
        """{search: {"name{k=v,...}": value}}: what the gauges hold now (for tests and scripts)."""
        return {s: {f"{name}{{{','.join(f'{k}={v}' for k, v in tags)}}}": value
                    for (name, tags), value in kept.items()}
                for s, kept in self._values.items() if search in (None, s)}

    def where(self) -> dict:
        return {"node_id": __import__("ray").get_runtime_context().get_node_id(), "dashboard": self.dashboard_path}


def progress_line(search: str, values: list[tuple[str, dict, float]]) -> str:
    """'<search>: 2 of 5 done (ok 2, running 1, pending 2) | best accuracy: l0 0.91, lwiq 0.88'."""
    counts, best, metric = Counter(), {}, None
    for name, tags, value in values:
        if name == "ranksearch_trials":
            counts[tags["status"]] += int(value)
        elif name == "ranksearch_best":
            best[tags["method"]], metric = value, tags["metric"]
    done = sum(counts[s] for s in FINISHED)
    line = f"{search}: {done} of {sum(counts.values())} done ("
    line += ", ".join(f"{s} {counts[s]}" for s in STATUSES if counts[s]) + ")"
    if best:
        line += f" | best {metric}: " + ", ".join(f"{m} {v:.4f}" for m, v in sorted(best.items()))
    return line


def metrics_actor(create: bool = True):
    """The cluster's metrics actor (created on first use when `create`), or None when there is none."""
    import ray

    if not create:
        try:
            return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        except ValueError:
            return None
    options = {"name": ACTOR_NAME, "namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True,
               "num_cpus": 0, "max_restarts": -1}
    head = _head_node()
    if head:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    return ray.remote(MetricsHolder).options(**options).remote()


def _head_node() -> str | None:
    """The head's node id: it lives as long as the cluster (and holds Grafana's dashboard folder)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None


class SearchMetrics(tune.Callback):
    """Recomputes a search's values from Tune's trial list at each event and sends them to the
    actor (fire and forget; the last send is awaited so it lands before the driver exits).
    Tune pickles callbacks with its experiment state: the actor handle is not kept across it."""

    def __init__(self, search: str, methods: tuple[str, ...], objectives: list[dict]):
        self.search, self.methods = search, methods  # methods: one per plan slot, by slot index
        self.metric, self.mode = objectives[0]["metric"], objectives[0]["mode"]
        self.hv = self.metric in BOUNDED and self.mode == "max" and {"metric": "params", "mode": "min"} in objectives
        self._actor = None

    def __getstate__(self):
        return {**self.__dict__, "_actor": None}

    def setup(self, **info):
        try:
            self._actor = metrics_actor()
        except Exception as exc:  # metrics are a view: never fail a search for them
            log.warning("ranksearch metrics actor not started: %s", exc)
        self._send(self.values([]))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._send(self.values(trials, trial, "start"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._send(self.values(trials, trial, "complete"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._send(self.values(trials, trial, "error"))

    def on_experiment_end(self, trials, **info):
        self._send(self.values(trials, running=False), wait=True)

    def _send(self, values: list, wait: bool = False) -> None:
        if self._actor is None:
            return
        ref = self._actor.update.remote(self.search, values)
        if wait:
            import ray

            try:
                ray.get(ref, timeout=30)
            except Exception as exc:
                log.warning("ranksearch metrics not updated at the end of %s: %s", self.search, exc)

    def values(self, trials, ended=None, ending: str | None = None, running: bool = True) -> list:
        """[(metric, tags, value)] of the search now: `ended` is the trial whose event ("start",
        "complete", "error") this is (callbacks run before Tune updates its status)."""
        state = ["pending"] * len(self.methods)
        results = {}
        for t in trials:
            slot = t.config.get("slot")
            if slot is None or slot >= len(state):
                continue
            event = ending if t is ended else None
            status = None if event == "start" else trial_status(t, event)
            if status is None and ((t.status == "RUNNING" and t is not ended) or event == "start"):
                status = "running"
            state[slot] = status or "pending"
            results[slot] = t.last_result or {}
        counts, totals = Counter(zip(self.methods, state)), Counter(self.methods)
        out = [("ranksearch_trials", {"method": m, "status": s}, counts[m, s]) for m in totals for s in STATUSES]
        out += [("ranksearch_trials_total", {"method": m}, n) for m, n in totals.items()]
        ok = [(self.methods[i], r) for i, r in results.items()
              if state[i] == "ok" and isinstance(r.get(self.metric), (int, float))]
        pick = max if self.mode == "max" else min
        by_method, by_budget, fronts = defaultdict(list), defaultdict(list), defaultdict(list)
        for method, r in ok:
            by_method[method].append(r[self.metric])
            by_budget[budget_label(r)].append(r[self.metric])
            if self.hv and r.get("params") and r.get("dense_params"):
                fronts[method].append((r[self.metric], r["params"] / r["dense_params"]))
        out += [("ranksearch_best", {"method": m, "metric": self.metric}, pick(v)) for m, v in by_method.items()]
        out += [("ranksearch_best_by_budget", {"budget": b, "metric": self.metric}, pick(v)) for b, v in by_budget.items()]
        out += [("ranksearch_hypervolume", {"method": m}, hypervolume(p, [0.0, 1.0], ["max", "min"]))
                for m, p in fronts.items()]
        out += [("ranksearch_search_running", {}, int(running)),
                ("ranksearch_last_update_timestamp_seconds", {}, time.time())]
        return out
