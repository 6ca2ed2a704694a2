"""Quality of the rank-selection methods: method × format × budget against the dense model
trained the same way (same epochs, optimizer, seed), on digits by default or MNIST
(`python -m bench --only quality --dataset mnist:DIR`).

Reported per run: test accuracy and its gap to dense, whole-model compression
(dense params / params, biases and untensorized layers included) and compression of
the tensorized layers alone, rank-search time and wall time. The papers' targets
(MNIST): MLP ≥ 50× within 1 point, LeNet-5 ≥ 20× within 0.5 point.
"""

from __future__ import annotations

import torch

from models.data import load_dataset
from models.train import fit

METHODS = ("fixed", "posthoc", "bayesian", "l0", "lwiq")


def _plan(quick: bool):
    """(model, formats, budgets, train settings) per model."""
    if quick:
        return [("mlp", ("ttm",), (0.05,), {"epochs": 3, "finetune_epochs": 1, "max_rank": 8, "lr": 1e-2})]
    return [
        ("mlp", ("tt", "ttm"), (0.02, 0.05), {"epochs": 15, "finetune_epochs": 3, "max_rank": 16, "lr": 1e-2}),
        ("lenet5", ("tt", "tucker"), (0.05,), {"epochs": 15, "finetune_epochs": 3, "max_rank": 16, "lr": 5e-3}),
    ]


def _row(record: dict, dense_accuracy: float) -> dict:
    return {
        "model": record["model"], "method": record["method"], "format": record["format"] or "-",
        "budget": record["budget"], "accuracy": round(record["accuracy"], 4),
        "delta_vs_dense": round(record["accuracy"] - dense_accuracy, 4),
        "params": record["params"], "compression": round(record["compression"], 1),
        "tensorized_compression": (round(record["tensorized_dense_params"] / record["tensorized_params"], 1)
                                   if record["tensorized_params"] else "-"),
        "budget_met": record["budget_met"], "ranks": record["ranks"],
        "rank_search_time_s": round(record["rank_search_time_s"], 2), "wall_time_s": round(record["wall_time_s"], 2),
    }


def _markdown(rows: list[dict], dataset: str) -> str:
    head = ("| model | method | format | budget | accuracy | Δ vs dense | params | compression | "
            "tensorized compression | budget met | rank search s | wall s |")
    lines = [f"Dataset: `{dataset}`; same training for every row (see bench/quality.py).", "", head,
             "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['format']} | {r['budget'] if r['budget'] is not None else '-'} | "
            f"{r['accuracy']:.4f} | {r['delta_vs_dense']:+.4f} | {r['params']:,} | {r['compression']}× | "
            f"{r['tensorized_compression']}{'×' if r['tensorized_compression'] != '-' else ''} | {r['budget_met']} | {r['rank_search_time_s']} | {r['wall_time_s']} |"
        )
    return "\n".join(lines)


def run(quick: bool = False, device: str = "cpu", dataset: str = "digits") -> dict:
    torch.set_num_threads(2)
    data = load_dataset(dataset, seed=0)
    rows = []
    for model, formats, budgets, train in _plan(quick):
        dense = fit(model=model, dataset=dataset, data=data, method="dense", train=train, device=device)
        rows.append(_row(dense, dense["accuracy"]))
        for fmt in formats:
            for budget in budgets:
                for method in METHODS:
                    record = fit(model=model, dataset=dataset, data=data, method=method, format=fmt, budget=budget,
                                 train=train, device=device)
                    rows.append(_row(record, dense["accuracy"]))
                    print(f"  {model} {method} {fmt} {budget}: acc {record['accuracy']:.4f} "
                          f"({record['compression']:.1f}x)", flush=True)
    return {"rows": rows, "markdown": _markdown(rows, dataset)}
