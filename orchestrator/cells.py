"""cells.parquet: one row per (model, dataset, format, method, budget) cell, over its seeds.

A single trial's accuracy moves by a point or more between seeds on small data, so a front of
single trials ranks methods by noise. A cell's row holds, for every objective and for params /
compression, the mean and the standard deviation over its seeds (per seed: the best of the
cell's samples on the first objective, the point a user would pick), the number of seeds, and a
paired test against the best cell of the same model and budget: the per-seed differences
d_s = best_s − cell_s over the seeds both ran, t = mean(d) / (std(d) / √n), two-sided p from
Student's t with n − 1 degrees of freedom. `significant` is p < 0.05; with one common seed
nothing can be tested and `p_value` is null. `on_front` marks the cells whose *means* are
non-dominated among the model's cells (the front a user can trust more than one over trials).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .pareto import pareto_mask

KEY = ("model", "dataset", "format", "method", "budget")
ALPHA = 0.05
SINGLE_SEED_NOTE = ("single seed per cell: the differences below are not tested against seed noise "
                    "(give the spec's search `seeds: [0, 1, ...]`)")


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _per_seed(rows: list[dict], first: dict) -> dict[int, dict]:
    """seed -> the row of the cell's best sample for that seed on the first objective."""
    best: dict[int, dict] = {}
    sign = 1.0 if first["mode"] == "max" else -1.0
    for r in rows:
        seed = r.get("seed") if r.get("seed") is not None else 0
        if seed not in best or sign * r[first["metric"]] > sign * best[seed][first["metric"]]:
            best[seed] = r
    return best


def paired_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p of the paired t-test of a against b (None with fewer than two pairs;
    0 when every difference is the same non-zero value, 1 when all are zero)."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return None
    if np.allclose(d, d[0]):
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def cells_rows(trials: pa.Table, objectives: list[dict]) -> list[dict]:
    """One dict per cell of the finished trials (see the module docstring for the columns)."""
    first = objectives[0]
    metrics = list(dict.fromkeys([o["metric"] for o in objectives] + ["params", "compression"]))
    ok = [r for r in trials.to_pylist() if r["status"] == "ok" and all(_finite(r[o["metric"]]) for o in objectives)]
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault(tuple(r[k] for k in KEY), []).append(r)
    cells = []
    for key, rows in groups.items():
        seeds = _per_seed(rows, first)
        cell = dict(zip(KEY, key))
        cell.update(seeds=len(seeds), trials=len(rows), seed_list=sorted(seeds), _by_seed=seeds)
        for m in metrics:
            values = [s[m] for s in seeds.values() if _finite(s[m])]
            cell[f"{m}_mean"] = statistics.mean(values) if values else None
            cell[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else None
        cells.append(cell)
    _compare_to_best(cells, first)
    _mark_fronts(cells, objectives)
    for cell in cells:
        del cell["_by_seed"]
    cells.sort(key=lambda c: (c["model"], c["budget"] if c["budget"] is not None else math.inf, c["method"],
                              c["format"] or ""))
    return cells


def _compare_to_best(cells: list[dict], first: dict) -> None:
    metric, sign = first["metric"], (1.0 if first["mode"] == "max" else -1.0)
    by_group: dict[tuple, list[dict]] = {}
    for c in cells:
        by_group.setdefault((c["model"], c["dataset"], c["budget"]), []).append(c)
    for group in by_group.values():
        best = max(group, key=lambda c: sign * c[f"{metric}_mean"])
        for c in group:
            common = sorted(set(c["_by_seed"]) & set(best["_by_seed"]))
            c["is_best"] = c is best
            c[f"delta_{metric}_vs_best"] = c[f"{metric}_mean"] - best[f"{metric}_mean"]
            c["paired_seeds"] = len(common)
            if c is best:
                c["p_value"], c["significant"] = None, None
                continue
            p = paired_p_value([best["_by_seed"][s][metric] for s in common], [c["_by_seed"][s][metric] for s in common])
            c["p_value"], c["significant"] = p, (None if p is None else p < ALPHA)


def _mark_fronts(cells: list[dict], objectives: list[dict]) -> None:
    modes = [o["mode"] for o in objectives]
    for model in {c["model"] for c in cells}:
        members = [c for c in cells if c["model"] == model]
        values = np.array([[c[f"{o['metric']}_mean"] for o in objectives] for c in members], dtype=float)
        for c, on in zip(members, pareto_mask(values, modes)):
            c["on_front"] = bool(on)


def cells_table(trials: pa.Table, objectives: list[dict]) -> pa.Table:
    rows = cells_rows(trials, objectives)
    first = objectives[0]["metric"]
    metrics = list(dict.fromkeys([o["metric"] for o in objectives] + ["params", "compression"]))
    fields = [("model", pa.string()), ("dataset", pa.string()), ("format", pa.string()), ("method", pa.string()),
              ("budget", pa.float64()), ("seeds", pa.int64()), ("trials", pa.int64()), ("seed_list", pa.list_(pa.int64()))]
    fields += [(f"{m}_{s}", pa.float64()) for m in metrics for s in ("mean", "std")]
    fields += [("is_best", pa.bool_()), (f"delta_{first}_vs_best", pa.float64()), ("paired_seeds", pa.int64()),
               ("p_value", pa.float64()), ("significant", pa.bool_()), ("on_front", pa.bool_())]
    schema = pa.schema(fields)
    return pa.table({f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema}, schema=schema)


def _shown(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def cells_text(path) -> str:
    """cells.parquet (a file or the report folder holding it) as the printed table: mean ± std per
    cell, Δ to the best cell of its model and budget, and whether that Δ beats the seed noise."""
    path = Path(path)
    table = pq.read_table(path / "cells.parquet" if path.is_dir() else path)
    rows = table.to_pylist()
    if not rows:
        return "cells: no finished trials"
    first = next(n[: -len("_mean")] for n in table.column_names if n.endswith("_mean"))
    delta = f"delta_{first}_vs_best"
    head = ["model", "method", "format", "budget", "seeds", f"{first} mean ± std", "params", "compression",
            "Δ vs best", "vs seed noise", "front"]
    lines = []
    for r in rows:
        spread = f" ± {r[f'{first}_std']:.4f}" if r[f"{first}_std"] is not None else ""
        if r["is_best"]:
            noise = "best"
        elif r["p_value"] is None:
            noise = "untested"
        else:
            noise = f"{'worse' if r['significant'] else 'within noise'} (p={r['p_value']:.2g})"
        lines.append([r["model"], r["method"], r["format"] or "-", "-" if r["budget"] is None else f"{r['budget']:g}",
                      str(r["seeds"]), f"{r[f'{first}_mean']:.4f}{spread}", _shown(r["params_mean"], ",.0f"),
                      _shown(r["compression_mean"], ".1f", "x"), f"{r[delta]:+.4f}", noise,
                      "*" if r["on_front"] else ""])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    out = ["cells (mean over seeds; Δ and paired t-test vs the best cell of the same model and budget; "
           "* = on the front of cell means):",
           "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(l, widths)) for l in lines]
    if max(r["seeds"] for r in rows) <= 1:
        out.append(SINGLE_SEED_NOTE)
    return "\n".join(out)


def draw_error_bars(ax, cells: list[dict], model: str, method: str, metric: str, colour: str) -> None:
    """Cell means with ± one std over seeds (both axes) for one model and method in pareto.png."""
    pts = [c for c in cells if c["model"] == model and c["method"] == method and c["seeds"] > 1
           and c[f"{metric}_mean"] is not None]
    if not pts:
        return
    ax.errorbar([c["params_mean"] for c in pts], [c[f"{metric}_mean"] for c in pts],
                yerr=[c[f"{metric}_std"] or 0.0 for c in pts], xerr=[c["params_std"] or 0.0 for c in pts],
                fmt="D", ms=4, color=colour, ecolor=colour, elinewidth=1, capsize=3, alpha=0.9)
