"""Factorized layers against their dense counterparts: parameters, forward and forward+backward time.

Every format (cp, tucker, tt, ttm) at max rank 8 and 16, side by side with
nn.Linear / nn.EmbeddingBag in the same process: each layer is warmed up, then
the layers take turns (one timed call each per round, so drift in the machine's
load hits all of them alike) and the median over rounds is reported, as a
ratio to the dense layer. A round times a block of calls (as many as fill
`min_block_s`, fixed in warm-up) so fast layers are not timer noise. Forward is timed under no_grad (inference); forward+
backward computes the gradients of every parameter and, for Linear, of the input
too (as in any layer but the first). Embedding ids are uniform over the table
(few repeats: the worst case for the factorized bag, which computes each distinct
id of a batch once). The dense bag is timed with its default dense gradient and,
for reference, with sparse=True.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn

from ranksearch.models.tensorized import FORMATS, FactorizedEmbeddingBag, FactorizedLinear

FULL = dict(
    cases=[
        dict(name="Linear 784→512, batch 256", kind="linear", in_features=784, out_features=512, batch=256),
        dict(name="Linear 4096→4096, batch 256", kind="linear", in_features=4096, out_features=4096, batch=256),
        dict(name="EmbeddingBag 10⁶×128, 4096 bags of 1 id", kind="bag", rows=10**6, dim=128, bags=4096, pooling=1),
        dict(name="EmbeddingBag 10⁶×128, 4096 bags of 10 ids", kind="bag", rows=10**6, dim=128, bags=4096, pooling=10),
    ],
    ranks=[8, 16],
    warmup=2,
    repeats=7,
    min_block_s=0.05,
)
QUICK = dict(
    cases=[
        dict(name="Linear 784→512, batch 32", kind="linear", in_features=784, out_features=512, batch=32),
        dict(name="EmbeddingBag 10⁵×64, 256 bags of 4 ids", kind="bag", rows=10**5, dim=64, bags=256, pooling=4),
    ],
    ranks=[8],
    warmup=1,
    repeats=3,
    min_block_s=0.005,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One layer under test and how to call it."""

    def __init__(self, label, module, fmt, max_rank, forward_inputs, backward_inputs, device):
        self.label, self.module, self.format, self.max_rank = label, module, fmt, max_rank
        self.forward_inputs, self.backward_inputs, self.device = forward_inputs, backward_inputs, device
        self.fwd: list[float] = []
        self.fwdbwd: list[float] = []
        self.calls = {"fwd": 1, "fwdbwd": 1}  # calls per timed block, set in warm-up

    def _fwd_once(self) -> None:
        with torch.no_grad():
            self.module(*self.forward_inputs)

    def _fwdbwd_once(self) -> None:
        for p in self.module.parameters():
            p.grad = None
        for x in self.backward_inputs:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.grad = None
        self.module(*self.backward_inputs).sum().backward()

    def _block(self, what: str) -> float:
        """Seconds per call over a block of calls (one timer read per block: stable for fast layers)."""
        once = self._fwd_once if what == "fwd" else self._fwdbwd_once
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(self.calls[what]):
            once()
        _sync(self.device)
        return (time.perf_counter() - start) / self.calls[what]

    def calibrate(self, what: str, min_block_s: float, max_calls: int = 200) -> None:
        per_call = min(self._block(what) for _ in range(2))
        self.calls[what] = max(1, min(max_calls, math.ceil(min_block_s / max(per_call, 1e-9))))

    def forward(self) -> float:
        return self._block("fwd")

    def forward_backward(self) -> float:
        return self._block("fwdbwd")

    def params(self) -> int:
        if hasattr(self.module, "num_parameters"):
            return self.module.num_parameters()
        return sum(p.numel() for p in self.module.parameters())


def _variants(case: dict, ranks, device: torch.device) -> list[Variant]:
    gen = torch.Generator().manual_seed(0)
    out = []
    if case["kind"] == "linear":
        x = torch.randn(case["batch"], case["in_features"], generator=gen).to(device)
        x_grad = x.clone().requires_grad_()
        dense = nn.Linear(case["in_features"], case["out_features"]).to(device)
        out.append(Variant("nn.Linear", dense, "dense", None, (x,), (x_grad,), device))
        for fmt in FORMATS:
            for r in ranks:
                layer = FactorizedLinear(case["in_features"], case["out_features"], format=fmt, max_rank=r).to(device)
                out.append(Variant(f"{fmt} r{r}", layer, fmt, r, (x,), (x_grad,), device))
    else:
        n_ids = case["bags"] * case["pooling"]
        ids = torch.randint(0, case["rows"], (n_ids,), generator=gen).to(device)
        offsets = torch.arange(0, n_ids, case["pooling"]).to(device)
        inputs = (ids, offsets)
        dense = nn.EmbeddingBag(case["rows"], case["dim"], mode="sum").to(device)
        out.append(Variant("nn.EmbeddingBag", dense, "dense", None, inputs, inputs, device))
        sparse = nn.EmbeddingBag(case["rows"], case["dim"], mode="sum", sparse=True).to(device)
        out.append(Variant("nn.EmbeddingBag sparse", sparse, "dense-sparse", None, inputs, inputs, device))
        for fmt in FORMATS:
            for r in ranks:
                layer = FactorizedEmbeddingBag(case["rows"], case["dim"], format=fmt, max_rank=r, mode="sum").to(device)
                out.append(Variant(f"{fmt} r{r}", layer, fmt, r, inputs, inputs, device))
    return out


def _measure(variants: list[Variant], warmup: int, repeats: int, min_block_s: float) -> None:
    for v in variants:
        for _ in range(warmup):
            v.forward()
            v.forward_backward()
        v.calibrate("fwd", min_block_s)
        v.calibrate("fwdbwd", min_block_s)
    for _ in range(repeats):  # rounds: every layer once per round
        for v in variants:
            v.fwd.append(v.forward())
        for v in variants:
            v.fwdbwd.append(v.forward_backward())


def _macs(v: Variant, case: dict) -> int | None:
    """Multiply-adds of the forward pass (the cost model's, for factorized layers)."""
    if case["kind"] != "linear":
        return None
    if v.format == "dense":
        return case["batch"] * case["in_features"] * case["out_features"]
    return v.module.flops(case["batch"])


def _fmt_ratio(x: float) -> str:
    return f"{x:.3g}×" if x < 100 else f"{x:,.0f}×"


def _table(case: dict, rows: list[dict]) -> str:
    lines = [
        f"### {case['name']}",
        "",
        "| layer | params | compression | fwd ms | fwd vs dense | fwd+bwd ms | fwd+bwd vs dense |"
        + (" MACs vs dense |" if case["kind"] == "linear" else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if case["kind"] == "linear" else ""),
    ]
    for r in rows:
        line = (
            f"| {r['layer']} | {r['params']:,} | {_fmt_ratio(r['compression'])} | {r['fwd_ms']:.3g} | "
            f"{r['fwd_ratio']:.2f} | {r['fwdbwd_ms']:.3g} | {r['fwdbwd_ratio']:.2f} |"
        )
        if case["kind"] == "linear":
            line += f" {r['macs_ratio']:.3g} |"
        lines.append(line)
    return "\n".join(lines)


def run(quick: bool = False, device: str = "cpu") -> dict:
    config = QUICK if quick else FULL
    device = torch.device(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    all_rows, tables = [], []
    try:
        for case in config["cases"]:
            variants = _variants(case, config["ranks"], device)
            _measure(variants, config["warmup"], config["repeats"], config["min_block_s"])
            dense = variants[0]
            dense_fwd, dense_fwdbwd = statistics.median(dense.fwd), statistics.median(dense.fwdbwd)
            dense_params, dense_macs = dense.params(), _macs(dense, case)
            rows = []
            for v in variants:
                fwd, fwdbwd, macs = statistics.median(v.fwd), statistics.median(v.fwdbwd), _macs(v, case)
                rows.append({
                    "case": case["name"],
                    **{k: case[k] for k in case if k not in ("name",)},
                    "layer": v.label,
                    "format": v.format,
                    "max_rank": v.max_rank,
                    "ranks": getattr(v.module, "ranks", None),
                    "params": v.params(),
                    "compression": dense_params / v.params(),
                    "fwd_ms": fwd * 1e3,
                    "fwd_ratio": fwd / dense_fwd,
                    "fwdbwd_ms": fwdbwd * 1e3,
                    "fwdbwd_ratio": fwdbwd / dense_fwdbwd,
                    "fwd_ms_all": [t * 1e3 for t in v.fwd],
                    "fwdbwd_ms_all": [t * 1e3 for t in v.fwdbwd],
                    "calls_per_block": dict(v.calls),
                    "macs": macs,
                    "macs_ratio": macs / dense_macs if macs is not None else None,
                })
            all_rows += rows
            tables.append(_table(case, rows))
            del variants
    finally:
        torch.set_num_threads(threads)
    header = (
        f"Device {device}, torch.set_num_threads(2), median over {config['repeats']} interleaved rounds (each "
        f"a block of calls lasting >= {config['min_block_s'] * 1e3:g} ms, per-call time) after {config['warmup']} "
        f"warm-up calls. Ratios are factorized / dense (time: < 1 is faster; "
        f"compression: dense params / params). `max_rank` is capped per edge where a larger rank is useless."
    )
    return {"rows": all_rows, "markdown": header + "\n\n" + "\n\n".join(tables) + "\n", "config": {
        "ranks": config["ranks"], "warmup": config["warmup"], "repeats": config["repeats"], "device": str(device),
    }}
