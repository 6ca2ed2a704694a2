"""DLRM with TT-embedding tables: (1) embedding-parameter reduction and AUC against the dense
DLRM on synthetic Criteo-like data; (2) training throughput and peak memory, TT tables against
TorchRec's fused tables (single-table lookup speed is bench/tables.py).

(1) Every model is trained by `models.train.fit` with the same data, seed and training
settings; only the method / budget differ. The data come from the synthetic generator
(`models.data.synthetic`) whose signal tables have a planted TT structure (rank 4 over
the id's three digits): the largest tables are the signal tables, the small ones noise.
Budgets are fractions of the dense parameter count of the factorized tables; the
reduction is reported for the factorized tables and for all embedding parameters
(the small plain tables included).

(2) The Criteo Kaggle cardinalities at dim 16 (33.8 M rows, 2.2 GB of weights as plain tables):
our DLRM with TT tables (ttm, rank 16) and the fused row-wise Adagrad table optimizer, TorchRec's
own DLRM over a `FusedEmbeddingBagCollection` (FBGEMM's table-batched kernel, row-wise Adagrad
fused into backward: what TorchRec users train), and our dense baseline (plain tables, sparse
gradients, the same row-wise Adagrad in backward). Adam trains the MLPs everywhere. Each variant
runs in its own process, so its peak resident memory is its own.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

THREADS_ENV = "RANKSEARCH_BENCH_THREADS"

FULL = dict(
    compression=dict(
        table_sizes=[1_000_000] * 4 + [10] * 22,  # 4 signal tables of 100^3 rows, 22 tiny noise tables
        num_samples=200_000,
        train={"epochs": 3, "finetune_epochs": 1, "batch_size": 2048, "lr": 1e-3, "max_rank": 16, "seed": 0},
        model_options={"embedding_dim": 16, "min_rows": 1000},
        # (method, budget, train overrides, method hyperparameters); dense also at fewer epochs, since it
        # overfits: the reference is the dense run with the best final validation AUC
        runs=[("dense", None, {"epochs": 1, "finetune_epochs": 0}, {}),
              ("dense", None, {"epochs": 2, "finetune_epochs": 0}, {}),
              ("dense", None, {}, {}),
              ("fixed", 1e-3, {}, {}), ("fixed", 3e-4, {}, {}), ("fixed", 1e-4, {}, {}),
              ("bayesian", 3e-4, {}, {}),
              ("bayesian", 3e-4, {}, {"kl_weight": 1e-3, "hyperprior": "half_cauchy", "eta": 0.1}),  # their DLRM
              ("l0", 3e-4, {}, {}), ("lwiq", 3e-4, {}, {}), ("lwiq", 1e-4, {}, {})],
    ),
    throughput=dict(table_sizes=None, dim=16, rank=16, batch=2048, steps=10, warmup=3, threads=1, timeout_s=1200,
                    variants=("tt", "torchrec_fused", "dense")),  # table_sizes None: the Kaggle cardinalities
)
QUICK = dict(
    compression=dict(
        table_sizes=[27_000] * 4 + [10] * 22,
        num_samples=20_000,
        train={"epochs": 1, "finetune_epochs": 1, "batch_size": 1024, "lr": 1e-3, "max_rank": 8, "seed": 0},
        model_options={"embedding_dim": 16, "min_rows": 1000, "dense_arch": [64], "over_arch": [64]},
        runs=[("dense", None, {}, {}), ("fixed", 1e-2, {}, {}), ("bayesian", 1e-2, {}, {})],
    ),
    throughput=dict(table_sizes=[100_000] * 4 + [100] * 22, dim=16, rank=8, batch=512, steps=3, warmup=1, threads=1,
                    timeout_s=300, variants=("tt", "torchrec_fused", "dense")),
)


def _threads() -> int:
    value = os.environ.get(THREADS_ENV)
    return int(value) if value else torch.get_num_threads()


# ---- (1) parameter reduction and AUC ----------------------------------------------------------


def compression(config: dict, device: str = "cpu") -> list[dict]:
    from ranksearch.models.data import load_dataset
    from ranksearch.models.train import fit

    data = load_dataset("synthetic-criteo", num_samples=config["num_samples"], table_sizes=config["table_sizes"],
                        seed=config["train"]["seed"])
    rows = []
    for method, budget, overrides, method_params in config["runs"]:
        train = {**config["train"], **overrides}
        epochs = []
        record = fit(model="dlrm", dataset="synthetic-criteo", data=data, method=method, format="ttm",
                     budget=budget if budget is not None else 0.1, train=train, method_params=method_params,
                     model_options=config["model_options"], device=device, on_epoch=epochs.append)
        factorized = [t for t in record["tables"] if t["factorized"]]
        fact_params = sum(t["params"] for t in factorized)
        fact_dense = sum(t["dense_params"] for t in factorized)
        rows.append({
            "method": method, "budget": budget, "epochs": train["epochs"], "finetune_epochs": train["finetune_epochs"],
            "method_params": method_params, "val_auc": epochs[-1]["val_auc"] if epochs else None,
            "val_auc_per_epoch": [e["val_auc"] for e in epochs], "auc": record["auc"], "logloss": record["logloss"],
            "accuracy": record["accuracy"], "embedding_params": record["embedding_params"],
            "embedding_dense_params": record["embedding_dense_params"],
            "embedding_reduction": record["embedding_compression"],
            "factorized_table_params": fact_params, "factorized_table_dense_params": fact_dense,
            "factorized_table_reduction": fact_dense / fact_params if fact_params else None,
            "params": record["params"], "dense_params": record["dense_params"], "compression": record["compression"],
            "ranks": {t["table"]: t["ranks"] for t in factorized}, "budget_met": record["budget_met"],
            "wall_time_s": record["wall_time_s"], "rank_search_time_s": record["rank_search_time_s"],
        })
    dense = max((r for r in rows if r["method"] == "dense"), key=lambda r: r["val_auc"], default=None)
    for r in rows:
        r["auc_vs_dense"] = None if dense is None else r["auc"] - dense["auc"]
        r["dense_reference"] = r is dense
    return rows


def _compression_markdown(config: dict, rows: list[dict]) -> str:
    sizes = config["table_sizes"]
    big = sorted({s for s in sizes if s >= config["model_options"]["min_rows"]}, reverse=True)
    t = config["train"]
    lines = [
        f"Synthetic Criteo-like data: {config['num_samples']:,} samples (10 % test), 26 tables: "
        f"{sum(s >= config['model_options']['min_rows'] for s in sizes)} of {', '.join(f'{s:,}' for s in big)} rows "
        f"(TT, ttm) and {sum(s < config['model_options']['min_rows'] for s in sizes)} of ≤ "
        f"{max(s for s in sizes if s < config['model_options']['min_rows']):,} rows (plain); "
        f"dim {config['model_options']['embedding_dim']}. fit: {t['epochs']} epoch(s) + {t['finetune_epochs']} fine-tune, "
        f"batch {t['batch_size']}, Adam lr {t['lr']}, max rank {t['max_rank']}, seed {t['seed']}.",
        "",
        "Δ AUC is against the dense run with the best final validation AUC (marked *)"
        + (" — dense runs at several epoch counts, since dense tables overfit" if sum(r["method"] == "dense" for r in rows) > 1
           else "") + ". Validation AUC is per epoch.",
        "",
        "| method | budget | epochs | test AUC | Δ AUC vs dense | log loss | embedding params "
        "| reduction (all embeddings) | reduction (TT tables) | ranks of the TT tables | val AUC per epoch | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        ranks = sorted({tuple(v) for v in r["ranks"].values()})
        rank_text = "; ".join(str(list(k)) for k in ranks) if ranks else "-"
        delta = "-" if r["auc_vs_dense"] is None or r["dense_reference"] else f"{r['auc_vs_dense']:+.4f}"
        name = r["method"] + ("*" if r["dense_reference"] else "")
        if r["method_params"]:
            name += " (" + ", ".join(f"{k} {v}" for k, v in r["method_params"].items()) + ")"
        curve = " → ".join(f"{v:.3f}" for v in r["val_auc_per_epoch"])
        red = "-" if r["factorized_table_reduction"] is None else f"{r['factorized_table_reduction']:,.0f}×"
        lines.append(
            f"| {name} | {r['budget'] if r['budget'] is not None else '-'} | "
            f"{r['epochs']}+{r['finetune_epochs']} | {r['auc']:.4f} | {delta} | "
            f"{r['logloss']:.4f} | {r['embedding_params']:,} | {r['embedding_reduction']:,.0f}× | {red} | "
            f"{rank_text} | {curve} | {r['wall_time_s']:.0f} |"
        )
    return "\n".join(lines)


# ---- (2) training throughput and peak memory -------------------------------------------------


def _synthetic_batches(sizes, batch: int, count: int, seed: int = 0):
    """Criteo-shaped batches: Zipf(1.1)-popular ids per table (hashed ids are), random dense and labels."""
    from bench.tables import batch_ids
    from ranksearch.models.data.criteo import make_batch

    out = []
    for b in range(count):
        sparse = torch.stack([batch_ids(n, batch, "zipf", "cpu", seed=seed + 1000 * b + k) for k, n in enumerate(sizes)], 1)
        g = torch.Generator().manual_seed(seed + b)
        dense = torch.rand(batch, 13, generator=g) * 5
        labels = (torch.rand(batch, generator=g) < 0.25).float()
        out.append(make_batch(dense, sparse, labels))
    return out


def _build(variant: str, sizes, dim: int, rank: int, table_lr: float):
    """(model, table optimizer or None) of one throughput variant."""
    from ranksearch.models.tensorized.table_optim import make_table_optimizer
    from ranksearch.models.zoo.dlrm import build_dlrm

    if variant == "torchrec_fused":  # TorchRec's own DLRM over FBGEMM TBE tables, row-wise Adagrad in backward
        from torchrec.models.dlrm import DLRM
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.optim import RowWiseAdagrad

        tables = [EmbeddingBagConfig(name=f"t_cat_{k}", embedding_dim=dim, num_embeddings=n, feature_names=[f"cat_{k}"])
                  for k, n in enumerate(sizes)]
        ebc = FusedEmbeddingBagCollection(tables, optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": table_lr})
        net = DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[512, 256, 64, dim],
                   over_arch_layer_sizes=[512, 256, 1])
        return net, None
    fmt = {"tt": "ttm", "dense": None}[variant]
    net = build_dlrm(sizes, embedding_dim=dim, format=fmt, max_rank=rank)
    return net, make_table_optimizer("rowwise_adagrad", table_lr).attach(net)


def throughput_worker(variant: str, sizes, dim: int, rank: int, batch: int, steps: int, warmup: int) -> dict:
    """Train `steps` batches (after `warmup`) in this process: samples/s and peak RSS."""
    import resource

    import torch.nn.functional as F

    torch.manual_seed(0)
    batches = _synthetic_batches(sizes, batch, 4)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    net, tables = _build(variant, sizes, dim, rank, 0.05)
    params = sum(p.numel() for p in net.parameters())
    dense = torch.optim.Adam([p for n, p in net.named_parameters() if "embedding_bag" not in n], lr=1e-3)
    times = []
    for step in range(warmup + steps):
        b = batches[step % len(batches)]
        start = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(net(b.dense, b.sparse).reshape(-1), b.labels)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "samples_per_s": batch / statistics.median(times), "params": params,
            "peak_rss_bytes": peak, "baseline_rss_bytes": base_rss, "loss": float(loss)}


def throughput(config: dict) -> list[dict]:
    """Each variant in its own process (peak memory is per process), one after the other."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    rows = []
    for variant in config["variants"]:
        args = dict(variant=variant, sizes=config["table_sizes"], dim=config["dim"], rank=config["rank"],
                    batch=config["batch"], steps=config["steps"], warmup=config["warmup"])
        code = ("import json, sys; from bench.dlrm import throughput_worker; "
                "print(json.dumps(throughput_worker(**json.loads(sys.argv[1]))))")
        env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"])}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], env=env, timeout=config["timeout_s"])
        if proc.returncode != 0:
            rows.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["variant"] == "torchrec_fused" and "error" not in r), None)
    for r in rows:
        r["vs_torchrec_fused"] = r["samples_per_s"] / ref["samples_per_s"] if ref and "error" not in r else None
        r["rank"] = config["rank"]
        if "error" not in r:
            dim = config["dim"]
            r["table_weights_and_rowwise_state_bytes"] = sum(n * (dim + 1) * 4 for n in config["table_sizes"])
    return rows


_LABELS = {
    "tt": "TT tables (ttm), fused row-wise Adagrad (ours)",
    "dense": "plain tables, sparse grads + row-wise Adagrad in backward (ours, dense baseline)",
    "torchrec_fused": "TorchRec FusedEmbeddingBagCollection (FBGEMM TBE, row-wise Adagrad fused)",
}


def _throughput_markdown(config: dict, rows: list[dict]) -> str:
    sizes = config["table_sizes"]
    lines = [
        f"DLRM training step (forward, backward, tables updated in backward, Adam on the MLPs), "
        f"{len(sizes)} tables of {sum(sizes):,} rows in all, dim {config['dim']}, batch {config['batch']:,}, "
        f"synthetic Criteo batches (Zipf ids), {config['threads']} thread(s), median of {config['steps']} steps; "
        f"each variant in its own process (peak resident memory):",
        "",
        "| variant | params | samples / s | ÷ TorchRec fused | peak RSS | plain tables: weights + row-wise state |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {_LABELS[r['variant']]} | - | failed: {r['error']} | - | - | - |")
            continue
        ratio = "-" if r["vs_torchrec_fused"] is None else f"{r['vs_torchrec_fused']:.2f}×"
        lines.append(
            f"| {_LABELS[r['variant']]} | {r['params']:,} | {r['samples_per_s']:,.0f} | {ratio} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['table_weights_and_rowwise_state_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


# ---- entry point ------------------------------------------------------------------------------


def run(quick: bool = False, device: str = "cpu", parts=("compression", "throughput")) -> dict:
    config = QUICK if quick else FULL
    before = torch.get_num_threads()
    threads = _threads()
    torch.set_num_threads(threads)
    try:
        result_rows, sections = [], []
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if "compression" in parts:
            rows = compression(config["compression"], device)
            result_rows += [{"part": "compression", **r} for r in rows]
            sections.append("### Embedding-parameter reduction and AUC against the dense DLRM\n\n"
                            + _compression_markdown(config["compression"], rows))
        if "throughput" in parts:
            from ranksearch.models.data.criteo import KAGGLE_TABLE_SIZES

            tconfig = dict(config["throughput"])
            tconfig["table_sizes"] = tconfig["table_sizes"] or list(KAGGLE_TABLE_SIZES)
            rows = throughput(tconfig)
            result_rows += [{"part": "throughput", **r} for r in rows]
            sections.append("### DLRM training throughput and memory: TT tables against TorchRec's fused tables\n\n"
                            + _throughput_markdown(tconfig, rows))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        note = (f"_torch threads {threads}; load average {load_before:.1f} before, {load:.1f} after "
                f"(other processes share the machine: compare rows within a table, not across runs)._")
        return {"rows": result_rows, "markdown": "\n\n".join(sections + [note]),
                "meta": {"threads": threads, "config": {k: config[k] for k in parts}}}
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="compression,throughput")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = run(args.quick, parts=tuple(args.parts.split(",")))
    print(result["markdown"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
