"""Search reports: trials.parquet, layers.parquet, pareto.parquet, pareto.png and index.html.

Every table is built with an explicit pyarrow schema so the columns and their
types are the same whatever the trials returned (None-only columns, zero
finished trials, no layers), and every file is written to a temporary name and
renamed, so a killed writer never leaves a half file behind.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ranksearch.orchestrator.cells import cells_table, draw_error_bars
from ranksearch.orchestrator.pareto import hypervolume, pareto_mask

__all__ = [
    "ReportPaths",
    "write_reports",
    "render_page",
    "load_reports",
    "front_table",
    "pareto_mask",
    "hypervolume",
    "TRIAL_SCHEMA",
    "LAYER_SCHEMA",
    "COLUMN_UNITS",
]

STATUSES = ("ok", "failed", "stopped")
METADATA_KEY = b"ranksearch"
FORMAT_VERSION = 1

_INT_LIST = pa.list_(pa.int64())
_MODE_GROUPS = pa.list_(_INT_LIST)
_TRIAL_LEVEL = ("trial_id", "model", "method", "budget")  # layers.parquet columns copied from the trial

# Contract columns of trials.parquet, in file order; hp_<name> columns follow.
TRIAL_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("model", pa.string()),
        ("dataset", pa.string()),
        ("format", pa.string()),
        ("method", pa.string()),
        ("budget", pa.float64()),
        ("budget_params", pa.int64()),
        ("seed", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("accuracy", pa.float64()),
        ("auc", pa.float64()),
        ("logloss", pa.float64()),
        ("params", pa.int64()),
        ("dense_params", pa.int64()),
        ("compression", pa.float64()),
        ("tensorized_params", pa.int64()),
        ("tensorized_dense_params", pa.int64()),
        ("embedding_params", pa.int64()),
        ("embedding_dense_params", pa.int64()),
        ("embedding_compression", pa.float64()),
        ("budget_met", pa.bool_()),
        ("wall_time_s", pa.float64()),
        ("rank_search_time_s", pa.float64()),
        ("epochs_done", pa.int64()),
        ("node_ip", pa.string()),
        ("node_id", pa.string()),
        ("ranks_json", pa.string()),
    ]
)

LAYER_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("format", pa.string()),
        ("budget", pa.float64()),
        ("layer", pa.string()),
        ("kind", pa.string()),
        ("shape", _INT_LIST),
        ("tensor_shape", _MODE_GROUPS),
        ("max_ranks", _INT_LIST),
        ("ranks", _INT_LIST),
        ("params", pa.int64()),
        ("dense_params", pa.int64()),
    ]
)

PARETO_PREFIX = pa.schema([("group", pa.string()), ("rank_in_front", pa.int64()), ("hypervolume", pa.float64())])

COLUMN_UNITS = {
    "budget": "fraction of the dense parameter count of the tensorized layers (None: dense, or see budget_params)",
    "budget_params": "absolute parameter budget, count",
    "accuracy": "fraction in [0, 1]",
    "auc": "ROC AUC in [0, 1]",
    "logloss": "mean binary cross-entropy, nats",
    "params": "parameter count, whole model (effective ranks)",
    "dense_params": "parameter count of the uncompressed model",
    "compression": "dense_params / params (ratio)",
    "tensorized_params": "parameter count of the tensorized layers",
    "tensorized_dense_params": "dense parameter count of the layers that were tensorized",
    "embedding_params": "DLRM: parameter count of all embedding tables (effective ranks); null otherwise",
    "embedding_dense_params": "DLRM: parameter count of the tables if all were dense",
    "embedding_compression": "DLRM: embedding_dense_params / embedding_params (ratio)",
    "budget_met": "params of the tensorized layers within the budget",
    "wall_time_s": "seconds, whole trial",
    "rank_search_time_s": "seconds spent selecting ranks",
    "epochs_done": "count",
    "node_ip": "IP of the Ray node the trial ran on",
    "node_id": "Ray node id the trial ran on",
    "ranks_json": "JSON object: layer -> list of selected ranks (one per rank edge)",
    "hp_*": "the trial's hyperparameters, in the units the spec gives them",
    "tensor_shape": "mode groups: one list of mode sizes per tensor leg group ([[out modes], [in modes]] for ttm)",
    "group": "'overall' or '<model>/<method>'",
    "rank_in_front": "1 = best on the first objective within the group's front",
    "hypervolume": "of the group's front, in the normalized space in the 'hypervolume' metadata",
}

_BOUNDED_MAX = ("accuracy", "auc")  # in [0, 1]: the worst possible value, 0, is the reference


@dataclass(frozen=True)
class ReportPaths:
    report_dir: Path
    trials: Path
    layers: Path
    pareto: Path
    plot: Path
    page: Path
    cells: Path | None = None


def write_reports(
    records: Iterable[Mapping], report_dir, *, objectives: Sequence[Mapping] | None = None, title: str | None = None
) -> ReportPaths:
    """Write the five report files for `records` (one dict per trial) into `report_dir`;
    `title` heads index.html (default: the folder above report_dir, the experiment's name).

    Everything is computed before the first file is written, so bad input
    raises without touching an existing report.
    """
    records = list(records)
    _check_records(records)
    trials = _trials_table(records)
    layers = _layers_table(records)
    objectives = _resolve_objectives(objectives, trials)
    pareto = _pareto_table(trials, objectives)
    cells = cells_table(trials, objectives)  # cells.py: mean ± std over seeds, paired test vs the best cell

    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(out, out / "trials.parquet", out / "layers.parquet", out / "pareto.parquet", out / "pareto.png",
                        out / "index.html", out / "cells.parquet")
    for table, path in ((trials, paths.trials), (layers, paths.layers), (pareto, paths.pareto), (cells, paths.cells)):
        _atomic_write(path, lambda tmp, t=table: pq.write_table(t, tmp))
    figure = _plot(trials, pareto, objectives, cells.to_pylist())
    _atomic_write(paths.plot, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    page = _page(records, trials, pareto, objectives, title or out.resolve().parent.name, live=False)
    _atomic_write(paths.page, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return paths


def render_page(records: Sequence[Mapping], *, title: str, objectives: Sequence[Mapping] | None = None,
                unfinished: Sequence[Mapping] = ()) -> str:
    """index.html of a running search: the finished `records` with their fronts, plus `unfinished`
    rows (trial_id, status running|pending, model, method, format, budget, ...) of trials still to end."""
    records = list(records)
    _check_records(records)
    trials = _trials_table(records)
    objectives = _resolve_objectives(objectives, trials)
    return _page(records, trials, _pareto_table(trials, objectives), objectives, title, live=True,
                 unfinished=unfinished)


def _page(records, trials: pa.Table, pareto: pa.Table, objectives, title: str, *, live: bool, unfinished=()) -> str:
    from .html_report import render_page as render

    configs = {r["trial_id"]: r.get("config") or {} for r in records}
    rows = [row | {"config": configs[row["trial_id"]]} for row in trials.to_pylist()] + [dict(u) for u in unfinished]
    hv = _metadata(pareto.schema)["hypervolume"]["objectives"]
    note = "hypervolume reference point: " + ", ".join(f"{d['value']} = {d['reference']:g}" for d in hv)
    return render(rows, pareto.to_pylist(), objectives, title=title, live=live, hypervolume_note=note)


def load_reports(report_dir) -> dict:
    """The three tables as DataFrames ("trials", "layers", "pareto"); metadata in `.attrs["ranksearch"]`."""
    frames = {}
    for name in ("trials", "layers", "pareto"):
        table = pq.read_table(Path(report_dir) / f"{name}.parquet")
        frame = table.to_pandas()
        frame.attrs["ranksearch"] = _metadata(table.schema)
        frames[name] = frame
    return frames


def front_table(report_dir) -> str:
    """pareto.parquet as an aligned text table, for `ranksearch report DIR`."""
    table = pq.read_table(Path(report_dir) / "pareto.parquet")
    meta = _metadata(table.schema)
    metrics = [o["metric"] for o in meta["objectives"] if o["metric"] != "params"]
    columns = ["group", "model", "method", "format", "budget", *metrics, "params", "compression", "hypervolume"]
    columns = list(dict.fromkeys(columns))
    cells = zip(*(table.column(c).to_pylist() for c in columns))
    rows = [[_fmt(name, v) for name, v in zip(columns, values)] for values in cells]
    if not rows:
        return "no Pareto-optimal trials (no trial finished with all objectives measured)"
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    text = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    text += ["  ".join(v.ljust(w) if i < 4 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    ref = ", ".join(f"{d['value']} = {d['reference']:g}" for d in meta["hypervolume"]["objectives"])
    return "\n".join(text) + f"\nhypervolume reference point: {ref}"


def _fmt(name: str, value) -> str:
    if value is None:
        return "-"
    if name == "params":
        return f"{value:,}"
    if name == "compression":
        return f"{value:.1f}x"
    if isinstance(value, float):
        return f"{value:.4f}" if name != "budget" else f"{value:g}"
    return str(value)


# --- input -----------------------------------------------------------------


def _check_records(records: list) -> None:
    """Catch orchestrator bugs here, not as a confusing front later."""
    seen = set()
    for r in records:
        tid = r.get("trial_id")
        if tid is None or tid in seen:
            raise ValueError(f"every record needs a unique trial_id, got {tid!r}")
        seen.add(tid)
        if r.get("status") not in STATUSES:
            raise ValueError(f"trial {tid}: status must be one of {STATUSES}, got {r.get('status')!r}")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _to_int(v, column: str):
    if _missing(v):
        return None
    if isinstance(v, numbers.Real) and float(v).is_integer():
        return int(v)
    raise ValueError(f"{column} must be an integer count, got {v!r}")


def _coerce(v, type_: pa.DataType, column: str):
    """Python value for one contract cell; NaN becomes null so "missing" has one spelling."""
    if _missing(v):
        return None
    if pa.types.is_string(type_):
        return str(v)
    if pa.types.is_float64(type_):
        v = float(v)
        return None if math.isnan(v) else v
    if pa.types.is_int64(type_):
        return _to_int(v, column)
    if pa.types.is_boolean(type_):
        return bool(v)
    if type_ == _INT_LIST:
        return [_to_int(x, column) for x in v]
    if type_ == _MODE_GROUPS:
        return _mode_groups(v)
    raise TypeError(type_)


def _ranks_json(r: Mapping):
    if r.get("layers"):
        return json.dumps({layer["layer"]: list(layer.get("ranks") or []) for layer in r["layers"]})
    if r.get("ranks") is not None:
        return json.dumps(dict(r["ranks"]))
    return None


def _trials_table(records: list) -> pa.Table:
    columns = {}
    for field in TRIAL_SCHEMA:
        if field.name == "ranks_json":
            values = [_ranks_json(r) for r in records]
        else:
            values = [_coerce(r.get(field.name), field.type, field.name) for r in records]
        columns[field.name] = pa.array(values, type=field.type)
    hp_names = sorted({k for r in records for k in (r.get("config") or {})})
    for name in hp_names:
        columns[f"hp_{name}"] = _hp_array([(r.get("config") or {}).get(name) for r in records])
    # a user task's own metric (its record names it in `metric`) gets a column of its own
    for name in sorted({r["metric"] for r in records if isinstance(r.get("metric"), str)} - set(columns)):
        columns[name] = pa.array([_coerce(r.get(name), pa.float64(), name) for r in records], type=pa.float64())
    return pa.table(columns).replace_schema_metadata(_metadata_bytes({"units": COLUMN_UNITS}))


def _hp_array(values: list) -> pa.Array:
    """One type per hyperparameter column; mixed or nested values become text (non-strings as JSON)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        return pa.array([None if v is None else bool(v) for v in values], type=pa.bool_())
    if all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in present):
        if all(isinstance(v, numbers.Integral) for v in present):
            return pa.array([None if v is None else int(v) for v in values], type=pa.int64())
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    text = [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values]
    return pa.array(text, type=pa.string())


def _mode_groups(shape) -> list:
    """Flat shapes become one group so every format fits list<list<int64>>."""
    shape = list(shape)
    if shape and all(isinstance(s, numbers.Integral) for s in shape):
        shape = [shape]
    return [[_to_int(x, "tensor_shape") for x in group] for group in shape]


def _layers_table(records: list) -> pa.Table:
    rows = []
    for r in records:
        for layer in r.get("layers") or []:
            row = {name: (r if name in _TRIAL_LEVEL else layer).get(name) for name in LAYER_SCHEMA.names}
            row["format"] = layer.get("format") or r.get("format")
            rows.append(row)
    columns = {f.name: [_coerce(row[f.name], f.type, f.name) for row in rows] for f in LAYER_SCHEMA}
    return pa.table(columns, schema=LAYER_SCHEMA).replace_schema_metadata(_metadata_bytes({"units": COLUMN_UNITS}))


# --- fronts ------------------------------------------------------------------


def _resolve_objectives(objectives, trials: pa.Table) -> list[dict]:
    """Validate objectives; by default accuracy, or AUC when no finished trial measured accuracy."""
    if objectives is None:
        ok = trials.filter(pc.equal(trials["status"], "ok"))
        has_accuracy, has_auc = (ok[c].null_count < ok.num_rows for c in ("accuracy", "auc"))
        metric = "auc" if has_auc and not has_accuracy else "accuracy"
        objectives = [{"metric": metric, "mode": "max"}, {"metric": "params", "mode": "min"}]
    resolved = []
    for o in objectives:
        metric, mode = o["metric"], o["mode"]
        if metric not in trials.column_names or not _is_numeric(trials.schema.field(metric).type):
            raise ValueError(f"objective {metric!r} is not a numeric column of trials.parquet")
        if mode not in ("min", "max"):
            raise ValueError(f"objective {metric!r}: mode must be 'min' or 'max', got {mode!r}")
        resolved.append({"metric": metric, "mode": mode})
    if not resolved:
        raise ValueError("at least one objective is needed")
    return resolved


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _column(table: pa.Table, name: str) -> np.ndarray:
    return pc.cast(table[name], pa.float64()).to_numpy(zero_copy_only=False)


def _hv_space(trials: pa.Table, objectives: list[dict], usable: np.ndarray):
    """Normalized objective values and the one reference point every group's hypervolume uses.

    accuracy/AUC (max) stay as they are with reference 0 (the worst possible);
    params (min) is taken as params / dense_params with reference 1.0 (dense
    size), so fronts of different models are measured in the same units; any
    other objective gets the worst value any finished trial reached, pushed 10 %
    further (max observed × 1.1 for a positive min metric). The reference is
    shared by all groups so their hypervolumes compare.
    """
    dense = _column(trials, "dense_params")
    values, described = [], []
    for o in objectives:
        metric, mode = o["metric"], o["mode"]
        v = _column(trials, metric)
        if metric in _BOUNDED_MAX and mode == "max":
            value, ref = metric, 0.0
        elif metric == "params" and mode == "min" and np.all(dense[usable] > 0):
            v, value, ref = v / np.where(dense > 0, dense, np.nan), "params / dense_params", 1.0
        else:
            seen = v[usable]
            worst = (seen.max() if mode == "min" else seen.min()) if len(seen) else 0.0
            margin = 0.1 * abs(worst) or 0.1
            value, ref = metric, float(worst + margin if mode == "min" else worst - margin)
        values.append(v)
        described.append({"metric": metric, "mode": mode, "value": value, "reference": ref})
    return np.column_stack(values), described


def _pareto_table(trials: pa.Table, objectives: list[dict]) -> pa.Table:
    """Rows of the front of each group ("overall" first, then "<model>/<method>")."""
    modes = [o["mode"] for o in objectives]
    raw = np.column_stack([_column(trials, o["metric"]) for o in objectives])
    ok = np.array([s == "ok" for s in trials["status"].to_pylist()], dtype=bool)
    usable = ok & np.all(np.isfinite(raw), axis=1)
    normalized, hv_objectives = _hv_space(trials, objectives, usable)
    ref = [d["reference"] for d in hv_objectives]

    groups = {"overall": np.flatnonzero(usable)}
    keys = [f"{m}/{x}" for m, x in zip(trials["model"].to_pylist(), trials["method"].to_pylist())]
    for key in sorted({keys[i] for i in groups["overall"]}):
        groups[key] = np.array([i for i in groups["overall"] if keys[i] == key], dtype=int)

    take, group_col, rank_col, hv_col = [], [], [], []
    for name, members in groups.items():
        if not len(members):
            continue
        front = members[pareto_mask(raw[members], modes)]
        order = np.lexsort(_minimized(raw[front], modes).T[::-1])
        front = front[order]
        hv = hypervolume(normalized[front], ref, modes)
        take += front.tolist()
        group_col += [name] * len(front)
        rank_col += list(range(1, len(front) + 1))
        hv_col += [hv] * len(front)

    rows = trials.take(pa.array(take, type=pa.int64()))
    prefix = [pa.array(group_col, pa.string()), pa.array(rank_col, pa.int64()), pa.array(hv_col, pa.float64())]
    table = pa.Table.from_arrays(prefix + rows.columns, schema=pa.schema(list(PARETO_PREFIX) + list(trials.schema)))
    meta = {
        "units": COLUMN_UNITS,
        "objectives": objectives,
        "hypervolume": {"objectives": hv_objectives, "reference_point": ref},
    }
    return table.replace_schema_metadata(_metadata_bytes(meta))


def _minimized(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    return values * np.array([-1.0 if m == "max" else 1.0 for m in modes])


# --- files -------------------------------------------------------------------


def _metadata_bytes(meta: dict) -> dict:
    return {METADATA_KEY: json.dumps({"version": FORMAT_VERSION, **meta}).encode()}


def _metadata(schema: pa.Schema) -> dict:
    return json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same directory, then rename over `path`.

    os.replace is atomic within a filesystem, so readers see the old file or the
    new one, never a partial one; on error the temporary file is removed. The
    writer creates the file itself (not mkstemp) so it gets the usual umask
    permissions rather than 0600.
    """
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- plot --------------------------------------------------------------------


def _plot(trials: pa.Table, pareto: pa.Table, objectives: list[dict], cells: Sequence[Mapping] = ()):
    """Objective vs params per model, one colour per method, each method's front as a staircase,
    and each cell's mean ± std over seeds as an error bar (cells of several seeds).

    Uses the object-oriented Figure API (Agg) so it never switches the pyplot
    backend of the process that calls it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    y_metric = next((o["metric"] for o in objectives if o["metric"] != "params"), objectives[0]["metric"])
    data = trials.filter(pc.equal(trials["status"], "ok")).to_pylist()
    data = [r for r in data if _finite(r["params"]) and _finite(r[y_metric])]
    models = sorted({r["model"] for r in data}) or [None]
    methods = sorted({r["method"] for r in data})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}

    fig = Figure(figsize=(5.5 * len(models), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    front_rows = [r for r in pareto.to_pylist() if r["group"] != "overall"]
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models):
        ax.set_xlabel("params")
        ax.set_ylabel(y_metric)
        if model is None:
            ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_title(model)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        for method in methods:
            pts = [(r["params"], r[y_metric]) for r in data if r["model"] == model and r["method"] == method]
            if not pts:
                continue
            ax.scatter(*zip(*pts), s=18, alpha=0.6, color=colours[method], label=method)
            front = sorted((r["params"], r[y_metric]) for r in front_rows if r["group"] == f"{model}/{method}")
            if front:
                ax.step(*zip(*front), where="post", color=colours[method], linewidth=1.2, marker="o", mfc="none", ms=7)
            draw_error_bars(ax, list(cells), model, method, y_metric, colours[method])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)
