"""Random vs pretrained start: bayesian, l0 and lwiq compress the same MLP at 2 % and 5 % of its
tensorized layers (TTM, the Bayesian paper's format), from a random initialization or from the
decomposed weights of a briefly trained dense model, with the same epochs and settings for both
starts (`python -m bench --only pretrained [--dataset mnist:DIR]`, else digits).

Reported per run: test accuracy, the accuracy of the compressed network before it trains (the
start), the dense model's own accuracy, compression and rank-search time. The pretrained rows
also had the dense model's training before them (`dense_epochs`), which the random rows did not:
the comparison is "compress what you have" against "train compressed from scratch" at equal
compression epochs.
"""

from __future__ import annotations

import os
import tempfile

import torch

from ranksearch.models.checkpoint import read_payload
from ranksearch.models.data import load_dataset
from ranksearch.models.train import fit

METHODS = ("bayesian", "l0", "lwiq")
BUDGETS = (0.02, 0.05)


def _settings(quick: bool, dataset: str) -> tuple[dict, dict, int]:
    """(dataset options, train settings of every compression run, dense pre-training epochs)."""
    if quick:
        return {}, {"epochs": 2, "finetune_epochs": 0, "max_rank": 8, "lr": 2e-3}, 2
    if dataset.startswith("mnist"):  # 20k of the 60k images keep the 12 runs at a few minutes
        return {"max_train": 20000}, {"epochs": 3, "finetune_epochs": 1, "max_rank": 20, "lr": 2e-3}, 3
    return {}, {"epochs": 8, "finetune_epochs": 2, "max_rank": 16, "lr": 5e-3}, 8


def run(quick: bool = False, device: str = "cpu", dataset: str = "digits") -> dict:
    torch.set_num_threads(1)
    options, train, dense_epochs = _settings(quick, dataset)
    data = load_dataset(dataset, seed=0, **options)
    common = {"model": "mlp", "dataset": dataset, "data": data, "device": device}
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "dense.pt")
        dense = fit(method="dense", train={**train, "epochs": dense_epochs, "finetune_epochs": 0}, save=saved, **common)
        checkpoint = os.path.join(tmp, "dense_state.pt")
        torch.save(read_payload(saved)["state_dict"], checkpoint)
        rows = []
        for budget in BUDGETS:
            for method in METHODS:
                for init in ("random", "pretrained"):
                    r = fit(method=method, format="ttm", budget=budget, train=train, init=init, checkpoint=checkpoint,
                            **common)
                    rows.append({
                        "method": method, "budget": budget, "init": init, "accuracy": round(r["accuracy"], 4),
                        "start_accuracy": round((r["start_metrics"] or {}).get("accuracy", float("nan")), 4),
                        "dense_accuracy": round(dense["accuracy"], 4), "compression": round(r["compression"], 1),
                        "budget_met": r["budget_met"], "rank_search_time_s": round(r["rank_search_time_s"], 2),
                        "wall_time_s": round(r["wall_time_s"], 1),
                    })
                    print(f"  {method} {budget} {init}: acc {r['accuracy']:.4f} start {rows[-1]['start_accuracy']:.4f} "
                          f"({r['compression']:.1f}x, search {r['rank_search_time_s']:.1f}s)", flush=True)
    return {"rows": rows, "markdown": _markdown(rows, dataset, train, dense_epochs, dense["accuracy"]),
            "dataset": dataset, "train": train, "dense_epochs": dense_epochs}


def _markdown(rows, dataset, train, dense_epochs, dense_accuracy) -> str:
    lines = [f"Dataset `{dataset}`, MLP, TTM; every compression run: {train}; the pretrained start decomposes a dense "
             f"MLP trained {dense_epochs} epochs (test accuracy {dense_accuracy:.4f}).", "",
             "| method | budget | init | accuracy | start accuracy | compression | budget met | rank search s | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['init']} | {r['accuracy']:.4f} | {r['start_accuracy']:.4f} | "
                     f"{r['compression']}× | {r['budget_met']} | {r['rank_search_time_s']} | {r['wall_time_s']} |")
    return "\n".join(lines)
