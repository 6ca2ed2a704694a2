"""DLRM with TT-embedding tables: (1) embedding-parameter reduction and AUC against the dense
DLRM on synthetic Criteo-like data; (2) lookup throughput of one table, TT against
nn.EmbeddingBag and TorchRec's fused EmbeddingBagCollection.

(1) Every model is trained by `models.train.fit` with the same data, seed and training
settings; only the method / budget differ. The data come from the synthetic generator
(`models.data.synthetic`) whose signal tables have a planted TT structure (rank 4 over
the id's three digits): the largest tables are the signal tables, the small ones noise.
Budgets are fractions of the dense parameter count of the factorized tables; the
reduction is reported for the factorized tables and for all embedding parameters
(the small plain tables included).

(2) One table of the same logical size per variant, all fed the same ids (uniform: few
repeats, the worst case for TT, which computes each distinct id of a batch once; or
Zipf-distributed, as real categorical ids are): forward + backward per batch, reported as
lookups per second (ids looked up / seconds). The variants take turns, one timed block each
per round, and the median over rounds is reported, so drift in the machine's load hits all
alike.
- TT: `FactorizedEmbeddingBag` (ttm, what `TTEmbeddingBagCollection` holds), gradients into
  the cores; no optimizer step.
- nn.EmbeddingBag (what `torchrec.EmbeddingBagCollection` holds): dense gradient of the whole
  table (autograd's default), and sparse=True (gradient rows only); no optimizer step.
- fused (CPU): `torchrec.modules.fused_embedding_modules.FusedEmbeddingBagCollection`, FBGEMM's
  SplitTableBatchedEmbeddingBagsCodegen with the SGD update fused into the backward, called
  with a KeyedJaggedTensor: its time INCLUDES the optimizer update, which the others leave
  out. On cuda only TT and nn.EmbeddingBag run (the CUDA build of fbgemm is not installed).
"""

from __future__ import annotations

import gc
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
    lookup=dict(
        cases=[
            dict(rows=10**6, dim=128, bags=4096, pooling=1),
            dict(rows=10**6, dim=128, bags=4096, pooling=1, ids="zipf"),
            dict(rows=10**6, dim=128, bags=4096, pooling=10),
            # 10^7 x 128 is 5 GB per dense copy: only the fused table beside TT (memory is shared)
            dict(rows=10**7, dim=128, bags=4096, pooling=1, variants=("tt", "fused")),
        ],
        ranks=[16, 32],
        repeats=7,
        min_block_s=0.2,
    ),
)
QUICK = dict(
    compression=dict(
        table_sizes=[27_000] * 4 + [10] * 22,
        num_samples=20_000,
        train={"epochs": 1, "finetune_epochs": 1, "batch_size": 1024, "lr": 1e-3, "max_rank": 8, "seed": 0},
        model_options={"embedding_dim": 16, "min_rows": 1000, "dense_arch": [64], "over_arch": [64]},
        runs=[("dense", None, {}, {}), ("fixed", 1e-2, {}, {}), ("bayesian", 1e-2, {}, {})],
    ),
    lookup=dict(cases=[dict(rows=10**5, dim=64, bags=1024, pooling=1)], ranks=[16], repeats=3, min_block_s=0.02),
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


# ---- (2) lookup throughput --------------------------------------------------------------------


class _Variant:
    def __init__(self, label: str, module, call, params: int, device: torch.device):
        self.label, self.module, self.call, self.params, self.device = label, module, call, params, device
        self.times: list[float] = []
        self.calls = 1

    def once(self) -> None:
        for p in self.module.parameters():
            p.grad = None
        self.call(self.module).sum().backward()

    def block(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(self.calls):
            self.once()
        _sync(self.device)
        return (time.perf_counter() - start) / self.calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(case: dict, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    n, rows = case["bags"] * case["pooling"], case["rows"]
    if case.get("ids", "uniform") == "uniform":
        return torch.randint(0, rows, (n,), generator=g).to(device)
    # Zipf(1.1) popularity, scattered over the table as hashing does (see models.data.synthetic)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    rank = ((1 + u * ((rows + 1.0) ** -0.1 - 1)) ** (1 / -0.1)).floor().long().clamp(1, rows) - 1
    return ((rank * 2_147_483_647 + 12345) % rows).to(device)


def _lookup_case(case: dict, ranks, repeats: int, min_block_s: float, device: torch.device) -> list[dict]:
    from ranksearch.models.tensorized import FactorizedEmbeddingBag

    rows, dim, bags, pooling = case["rows"], case["dim"], case["bags"], case["pooling"]
    wanted = case.get("variants", ("tt", "dense", "sparse", "fused"))
    ids = _ids(case, device)
    offsets = torch.arange(0, bags * pooling, pooling, device=device)
    plain = lambda m: m(ids, offsets)  # noqa: E731
    variants = []
    if "tt" in wanted:
        for r in ranks:
            tt = FactorizedEmbeddingBag(rows, dim, format="ttm", max_rank=r, mode="sum").to(device)
            variants.append(_Variant(f"TT ttm r{r} (FactorizedEmbeddingBag)", tt, plain, tt.num_parameters(), device))
    if "dense" in wanted:
        bag = torch.nn.EmbeddingBag(rows, dim, mode="sum").to(device)
        variants.append(_Variant("nn.EmbeddingBag, dense grad", bag, plain, rows * dim, device))
    if "sparse" in wanted:
        bag = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True).to(device)
        variants.append(_Variant("nn.EmbeddingBag, sparse grad", bag, plain, rows * dim, device))
    if "fused" in wanted and device.type == "cpu":  # fbgemm-gpu-cpu here; the CUDA build is not installed
        from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

        tables = [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])]
        fused = FusedEmbeddingBagCollection(tables, optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": 0.01})
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], ids, torch.full((bags,), pooling, dtype=torch.int32))
        variants.append(_Variant("torchrec FusedEmbeddingBagCollection (FBGEMM TBE, SGD fused in backward)",
                                 fused, lambda m: m(kjt).values(), rows * dim, device))

    for v in variants:  # warm up, then size blocks so each lasts about min_block_s
        v.once()
        v.calls = max(1, min(100, math.ceil(min_block_s / max(v.block(), 1e-9))))
    for _ in range(repeats):  # rounds: every variant once per round
        for v in variants:
            v.times.append(v.block())
    out = []
    for v in variants:
        seconds = statistics.median(v.times)
        out.append({
            "rows": rows, "dim": dim, "bags": bags, "pooling": pooling, "ids": case.get("ids", "uniform"),
            "unique_ids": int(torch.unique(ids).numel()), "lookups": bags * pooling, "device": device.type,
            "variant": v.label, "params": v.params, "compression": rows * dim / v.params,
            "ms_per_batch": seconds * 1e3, "lookups_per_s": bags * pooling / seconds,
            "spread": (max(v.times) - min(v.times)) / seconds,
        })
    del variants
    gc.collect()
    return out


def lookup(config: dict, device: torch.device) -> list[dict]:
    rows = []
    for case in config["cases"]:
        rows += _lookup_case(case, config["ranks"], config["repeats"], config["min_block_s"], device)
    return rows


def _lookup_markdown(rows: list[dict]) -> str:
    lines = []
    keys = dict.fromkeys((r["rows"], r["dim"], r["bags"], r["pooling"], r["ids"], r["device"]) for r in rows)
    for key in keys:
        n, d, b, p, ids, dev = key
        case = [r for r in rows if (r["rows"], r["dim"], r["bags"], r["pooling"], r["ids"], r["device"]) == key]
        ref = next((r for r in case if "Fused" in r["variant"]),
                   next((r for r in case if "sparse grad" in r["variant"]), case[0]))
        lines += [
            f"Table {n:,} × {d} on {dev}, {b:,} bags of {p} id{'s' if p > 1 else ''} ({ids} ids, "
            f"{case[0]['unique_ids']:,} distinct), forward + backward:",
            "",
            f"| variant | params | compression | ms / batch | lookups / s | vs {ref['variant'].split(' (')[0]} |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in case:
            lines.append(
                f"| {r['variant']} | {r['params']:,} | {r['compression']:,.0f}× | {r['ms_per_batch']:.2f} | "
                f"{r['lookups_per_s']:,.0f} | {r['lookups_per_s'] / ref['lookups_per_s']:.3f}× |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


# ---- entry point ------------------------------------------------------------------------------


def run(quick: bool = False, device: str = "cpu", parts=("compression", "lookup")) -> dict:
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
        if "lookup" in parts:
            rows = lookup(config["lookup"], torch.device(device))
            result_rows += [{"part": "lookup", **r} for r in rows]
            sections.append("### Lookup throughput, one table\n\n" + _lookup_markdown(rows))
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
    parser.add_argument("--parts", default="compression,lookup")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = run(args.quick, parts=tuple(args.parts.split(",")))
    print(result["markdown"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
