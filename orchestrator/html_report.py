"""The search as one self-contained HTML page: `report/index.html`.

The same page serves while a search runs (rewritten after every trial, see live_report.py;
it reloads itself every few seconds) and as the final report (written with the Parquet
files, without the reload). No script, no stylesheet or font from the network: inline CSS
and inline SVG plots, so it opens from a file, a shared drive or an air-gapped cluster.

What it shows: a progress line (done / running / pending / failed / stopped of total), one
row per method (the same counts as a bar, best primary metric, hypervolume of its fronts),
one plot per model (primary metric vs params, log scale, one colour per method, each
method's front as a staircase), and the per-trial table. Front members are marked in the
table: `class="front"` on the row and `data-front` listing the groups (`overall`,
`<model>/<method>`) whose front holds the trial, as in pareto.parquet.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from html import escape

LIVE_STATUSES = ("running", "pending")  # rows of trials without a record, live page only
STATUS_ORDER = ("ok", "failed", "stopped", "running", "pending")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")  # matplotlib's tab10, as in pareto.png
REFRESH_S = 5

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.15em;margin:1.4em 0 .4em}
.sub{color:#666} .badge{display:inline-block;padding:0 .5em;border-radius:.6em;font-size:.85em;color:#fff}
.badge.live{background:#d62728} .badge.final{background:#2ca02c}
table{border-collapse:collapse;font-size:13px} th,td{padding:2px 8px;border-bottom:1px solid #e4e4e4;text-align:left}
th{background:#f4f4f4;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.front td:first-child{font-weight:600} tr.front td.mark{color:#d4a000}
.s-ok{color:#2a7d2a} .s-failed{color:#c62828} .s-stopped{color:#8a6d00} .s-running{color:#1565c0} .s-pending{color:#888}
.bar{display:flex;width:220px;height:10px;background:#eee;border-radius:3px;overflow:hidden}
.bar span{display:block;height:100%} .b-ok{background:#4caf50} .b-failed{background:#e53935}
.b-stopped{background:#fbc02d} .b-running{background:#42a5f5}
.plots{display:flex;flex-wrap:wrap;gap:1em} svg{background:#fff;border:1px solid #ddd}
td.err{color:#c62828;max-width:28em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
td.hp{max-width:26em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;color:#444}
"""


def render_page(trials: list[dict], pareto: list[dict], objectives: list[dict], *, title: str,
                live: bool, hypervolume_note: str = "") -> str:
    """The whole page. `trials`: one row per trial (trials.parquet rows, plus `running` /
    `pending` rows while live; `config` may hold the hyperparameters); `pareto`: pareto.parquet rows."""
    metric = primary_metric(objectives)
    fronts = defaultdict(list)  # trial_id -> groups whose front holds it
    for row in pareto:
        fronts[row["trial_id"]].append(row["group"])
    counts = Counter(t["status"] for t in trials)
    done = sum(counts[s] for s in ("ok", "failed", "stopped"))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    head = (f"<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">" if live else "")
    state = (f"<span class=\"badge live\">live</span> rewritten after every trial, reloads every {REFRESH_S} s"
             if live else "<span class=\"badge final\">final</span>")
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if counts[s])
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", head,
        f"<title>{escape(title)} — ranksearch</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p class=\"sub\">{state} · updated {escape(stamp)}</p>",
        f"<p id=\"progress\" data-done=\"{done}\" data-total=\"{len(trials)}\"><b>{done} of {len(trials)}</b> trials "
        f"done{' — ' + escape(summary) if summary else ''}</p>",
        "<h2>Methods</h2>", _method_table(trials, pareto, objectives, metric),
        "<h2>Fronts</h2>", _plots(trials, pareto, metric),
        f"<p class=\"sub\">{escape(hypervolume_note)}</p>" if hypervolume_note else "",
        "<h2>Trials</h2>", _trial_table(trials, fronts, objectives),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def primary_metric(objectives: list[dict]) -> str:
    return next((o["metric"] for o in objectives if o["metric"] != "params"), objectives[0]["metric"])


def _best(rows: list[dict], metric: str, mode: str):
    values = [r[metric] for r in rows if r["status"] == "ok" and _finite(r.get(metric))]
    return (max if mode == "max" else min)(values) if values else None


def _method_table(trials, pareto, objectives, metric) -> str:
    mode = next(o["mode"] for o in objectives if o["metric"] == metric)
    by_method = defaultdict(list)
    for t in trials:
        by_method[t["method"]].append(t)
    hv = {row["group"]: row["hypervolume"] for row in pareto}
    rows = []
    for method, members in sorted(by_method.items(), key=lambda kv: str(kv[0])):
        counts = Counter(t["status"] for t in members)
        total = len(members)
        bar = "".join(f"<span class=\"b-{s}\" style=\"width:{100 * counts[s] / total:.1f}%\"></span>"
                      for s in ("ok", "failed", "stopped", "running") if counts[s])
        groups = sorted(g for g in hv if g.endswith(f"/{method}"))
        hv_text = ", ".join(f"{g.split('/')[0]} {hv[g]:.4f}" for g in groups) or "-"
        cells = [escape(str(method)), f"<div class=\"bar\">{bar}</div>"]
        cells += [str(counts[s]) for s in STATUS_ORDER] + [str(total), _fmt(metric, _best(members, metric, mode)), hv_text]
        rows.append(f"<tr data-method=\"{escape(str(method))}\">" + "".join(
            f"<td class=\"num\">{c}</td>" if i >= 2 else f"<td>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
    header = ["method", "progress", *STATUS_ORDER, "total", f"best {metric}", "hypervolume per model"]
    return _table("methods", header, rows)


def _trial_table(trials, fronts, objectives) -> str:
    metrics = [o["metric"] for o in objectives if o["metric"] != "params"]
    varying = _varying_hyperparameters(trials)
    header = ["trial_id", "front", "status", "model", "method", "format", "budget", "hyperparameters",
              *metrics, "params", "compression", "wall_time_s", "error"]
    rows = []
    for t in sorted(trials, key=lambda t: (STATUS_ORDER.index(t["status"]) if t["status"] in STATUS_ORDER else 9,
                                           str(t["trial_id"]))):
        groups = fronts.get(t["trial_id"], [])
        config = t.get("config") or {}
        hp = ", ".join(f"{k}={_short(config[k])}" for k in varying if k in config)
        full = ", ".join(f"{k}={_short(v)}" for k, v in sorted(config.items()))
        cells = [
            f"<td>{escape(str(t['trial_id']))}</td>",
            f"<td class=\"mark\">{'★' if 'overall' in groups else ('☆' if groups else '')}</td>",
            f"<td class=\"s-{escape(str(t['status']))}\">{escape(str(t['status']))}</td>",
            *(f"<td>{escape(_fmt(k, t.get(k)))}</td>" for k in ("model", "method", "format")),
            f"<td>{escape(budget_text(t))}</td>",
            f"<td class=\"hp\" title=\"{escape(full)}\">{escape(hp)}</td>",
            *(f"<td class=\"num\">{escape(_fmt(k, t.get(k)))}</td>" for k in (*metrics, "params", "compression",
                                                                              "wall_time_s")),
            f"<td class=\"err\" title=\"{escape(str(t.get('error') or ''))}\">{escape(str(t.get('error') or ''))}</td>",
        ]
        attrs = f" class=\"front\" data-front=\"{escape(' '.join(groups))}\"" if groups else ""
        rows.append(f"<tr data-trial=\"{escape(str(t['trial_id']))}\" data-status=\"{escape(str(t['status']))}\""
                    f"{attrs}>{''.join(cells)}</tr>")
    note = "<p class=\"sub\">★ on the overall front · ☆ on its model/method front</p>"
    return note + _table("trials", header, rows)


def _varying_hyperparameters(trials) -> list[str]:
    """Hyperparameters whose value differs between trials (the rest is the same everywhere)."""
    values = defaultdict(set)
    for t in trials:
        for k, v in (t.get("config") or {}).items():
            values[k].add(repr(v))
    present = Counter(k for t in trials for k in (t.get("config") or {}))
    configured = sum(bool(t.get("config")) for t in trials)
    return sorted(k for k, seen in values.items() if len(seen) > 1 or present[k] < configured)


def _table(table_id: str, header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return f"<table id=\"{table_id}\"><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


# --- plots ------------------------------------------------------------------

W, H, M = 460, 300, (48, 14, 40, 16)  # width, height, margins (left, top, bottom, right)


def _plots(trials, pareto, metric) -> str:
    ok = [t for t in trials if t["status"] == "ok" and _finite(t.get(metric)) and (t.get("params") or 0) > 0]
    if not ok:
        return "<p class=\"sub\">no finished trials yet</p>"
    methods = sorted({str(t["method"]) for t in ok})
    colour = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(methods)}
    fronts = defaultdict(list)
    for row in pareto:
        if row["group"] != "overall" and _finite(row.get(metric)) and (row.get("params") or 0) > 0:
            fronts[row["group"]].append((row["params"], row[metric]))
    svgs = []
    for model in sorted({str(t["model"]) for t in ok}):
        points = [t for t in ok if str(t["model"]) == model]
        svgs.append(_svg(model, points, {m: sorted(fronts.get(f"{model}/{m}", [])) for m in methods}, colour, metric))
    legend = " ".join(f"<span style=\"color:{colour[m]}\">● {escape(m)}</span>" for m in methods)
    return f"<p>{legend}</p><div class=\"plots\">{''.join(svgs)}</div>"


def _svg(model, points, fronts, colour, metric) -> str:
    xs = [math.log10(t["params"]) for t in points]
    ys = [t[metric] for t in points]
    x0, x1 = _pad(min(xs), max(xs), 0.1)
    y0, y1 = _pad(min(ys), max(ys), 0.05)
    left, top, bottom, right = M

    def px(x):
        return left + (math.log10(x) - x0) / (x1 - x0) * (W - left - right)

    def py(y):
        return H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)

    out = [f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" "
           f"data-model=\"{escape(model)}\" role=\"img\"><title>{escape(model)}: {escape(metric)} vs params</title>"]
    out.append(f"<text x=\"{W / 2}\" y=\"12\" text-anchor=\"middle\" font-size=\"12\" font-weight=\"600\">"
               f"{escape(model)}</text>")
    for k in range(math.floor(x0), math.ceil(x1) + 1):
        for sub in (1, 2, 5):
            v = sub * 10.0**k
            if x0 <= math.log10(v) <= x1:
                x = px(v)
                out.append(f"<line x1=\"{x:.1f}\" x2=\"{x:.1f}\" y1=\"{top}\" y2=\"{H - bottom}\" stroke=\"#eee\"/>")
                out.append(f"<text x=\"{x:.1f}\" y=\"{H - bottom + 13}\" font-size=\"10\" text-anchor=\"middle\">"
                           f"{_eng(v)}</text>")
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        y = py(v)
        out.append(f"<line x1=\"{left}\" x2=\"{W - right}\" y1=\"{y:.1f}\" y2=\"{y:.1f}\" stroke=\"#eee\"/>")
        out.append(f"<text x=\"{left - 4}\" y=\"{y + 3:.1f}\" font-size=\"10\" text-anchor=\"end\">{v:.3g}</text>")
    out.append(f"<text x=\"{(left + W - right) / 2}\" y=\"{H - 6}\" font-size=\"11\" text-anchor=\"middle\">params</text>")
    out.append(f"<text x=\"12\" y=\"{(top + H - bottom) / 2}\" font-size=\"11\" text-anchor=\"middle\" "
               f"transform=\"rotate(-90 12 {(top + H - bottom) / 2})\">{escape(metric)}</text>")
    for method, front in fronts.items():
        if front:
            d = f"M{px(front[0][0]):.1f},{py(front[0][1]):.1f}"
            for (_, ya), (xb, yb) in zip(front, front[1:]):
                d += f" H{px(xb):.1f} V{py(yb):.1f}"
            out.append(f"<path d=\"{d}\" fill=\"none\" stroke=\"{colour[method]}\" stroke-width=\"1.5\" "
                       f"data-front=\"{escape(method)}\"/>")
    for t in points:
        out.append(f"<circle cx=\"{px(t['params']):.1f}\" cy=\"{py(t[metric]):.1f}\" r=\"3.5\" "
                   f"fill=\"{colour[str(t['method'])]}\" fill-opacity=\"0.7\"><title>{escape(str(t['trial_id']))}: "
                   f"{escape(metric)} {t[metric]:.4f}, params {t['params']:,}</title></circle>")
    out.append("</svg>")
    return "".join(out)


def _pad(lo: float, hi: float, frac: float) -> tuple[float, float]:
    span = hi - lo or max(abs(hi), 1.0) * 0.1
    return lo - frac * span, hi + frac * span


def _eng(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def budget_text(t: dict) -> str:
    """'0.1', 'p12000' (an absolute budget) or '-' (dense)."""
    if t.get("budget") is not None:
        return f"{t['budget']:g}"
    return f"p{t['budget_params']}" if t.get("budget_params") is not None else "-"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _fmt(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if name == "params":
        return f"{value:,}"
    if name == "compression":
        return f"{value:.1f}x"
    if name == "wall_time_s":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
