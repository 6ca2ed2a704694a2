"""Embedding-table training throughput: TT tables against the plain tables users would run.

One table per variant, all fed the same ids, each call = forward + backward + the optimizer's
update (SGD, lr 0.01, on every side), reported as lookups per second and as a ratio to
`nn.EmbeddingBag(sparse=True)` + `torch.optim.SGD` (the issue's reference) and to TorchRec's
`FusedEmbeddingBagCollection` (FBGEMM's table-batched kernel with SGD fused into backward).
Each variant lives in a process of its own and the variants take turns, one timed block each
per round (the median over rounds is reported), so drift in the machine's load hits all alike
and no variant runs on another's allocator state. Every worker runs glibc malloc with trimming
off (`MALLOC_TRIM_THRESHOLD_` etc., `ALLOCATOR_ENV`), as a jemalloc/tcmalloc deployment behaves:
by default glibc hands freed multi-MB blocks back to the system and the next step page-faults
them in again (~800 faults per step for the sparse bag alone, 3.0 instead of 2.2 ms per batch
in this VM), a cost that depends on what else the process freed before, not on the table.

- TT ttm / tt: `FactorizedEmbeddingBag` with the fused lookup (`tt_lookup.py`) and the SGD
  table optimizer applied inside backward (`table_optim.py`); on CPU once with the compiled
  kernel and once with the pure-PyTorch path (what the kernel buys).
- ids: uniform (few repeats: the worst case for TT, which computes each distinct id once) or
  Zipf(1.1) popularity scattered over the table (as hashed categorical ids are).
- 10^7 x 128 is 5 GB per dense copy: only TT beside the fused table there.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import time

import torch

FULL = dict(
    cases=[
        dict(rows=10**6, dim=128, batch=8192, ids="uniform"),
        dict(rows=10**6, dim=128, batch=8192, ids="zipf"),
        dict(rows=10**7, dim=128, batch=8192, ids="uniform", variants=("ttm", "tt", "fused")),
    ],
    rank=16,
    threads=1,
    repeats=7,
    min_block_s=0.3,
)
QUICK = dict(
    cases=[dict(rows=10**5, dim=64, batch=1024, ids="uniform"), dict(rows=10**5, dim=64, batch=1024, ids="zipf")],
    rank=8,
    threads=1,
    repeats=3,
    min_block_s=0.02,
)
LR = 0.01
# glibc: large blocks from the heap, never trimmed (read at process start: set for the workers)
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**34),
                 "MALLOC_TOP_PAD_": str(2**28)}
REFERENCE = "nn.EmbeddingBag(sparse=True) + SGD"
FUSED = "TorchRec FusedEmbeddingBagCollection (FBGEMM TBE, SGD in backward)"


def batch_ids(rows: int, n: int, kind: str, device, seed: int = 0) -> torch.Tensor:
    """`n` ids: uniform, or Zipf(1.1) ranks scattered over the table by a fixed hash."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randint(0, rows, (n,), generator=g).to(device)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    rank = ((1 + u * ((rows + 1.0) ** -0.1 - 1)) ** (1 / -0.1)).floor().long().clamp(1, rows) - 1
    return ((rank * 2_147_483_647 + 12345) % rows).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One table and its training step (forward, backward, update)."""

    def __init__(self, label, step, params: int, device):
        self.label, self.step, self.params, self.device = label, step, params, device
        self.calls = 1

    def block(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(self.calls):
            self.step()
        _sync(self.device)
        return (time.perf_counter() - start) / self.calls


def _plain_variant(rows, dim, ids, offsets, grad, device):
    bag = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True).to(device)
    opt = torch.optim.SGD(bag.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        bag(ids, offsets).backward(grad)
        opt.step()

    return Variant(REFERENCE, step, rows * dim, device)


def _fused_variant(rows, dim, ids, batch, grad, device):
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    tables = [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])]
    fused = FusedEmbeddingBagCollection(tables, optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": LR})
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], ids, torch.ones(batch, dtype=torch.int32))
    return Variant(FUSED, lambda: fused(kjt).values().backward(grad), rows * dim, device)


def _tt_variant(fmt, rows, dim, rank, ids, offsets, grad, device, compiled: bool, optimizer="sgd"):
    from ranksearch.models.tensorized import FactorizedEmbeddingBag, tt_kernel
    from ranksearch.models.tensorized.table_optim import make_table_optimizer

    if not compiled:  # this worker's process only: the pure-PyTorch lookup path
        tt_kernel._state["module"] = None
    bag = FactorizedEmbeddingBag(rows, dim, format=fmt, max_rank=rank, mode="sum").to(device)
    make_table_optimizer(optimizer, LR).attach(bag)
    path = ("compiled kernel" if compiled else "PyTorch path") if device.type == "cpu" else device.type
    label = f"TT {fmt} r{rank}, fused {optimizer} ({path})"
    return Variant(label, lambda: bag(ids, offsets).backward(grad), bag.num_parameters(), device)


def _variant_specs(case: dict, device: torch.device) -> list[tuple]:
    """What each worker builds: ("plain",), ("fused",), ("tt", format, compiled, optimizer)."""
    from ranksearch.models.tensorized import tt_kernel

    wanted = case.get("variants", ("ttm", "tt", "plain", "fused"))
    specs = [("plain",)] if "plain" in wanted else []
    if "fused" in wanted and device.type == "cpu":  # fbgemm-gpu-cpu here; the CUDA build is not installed
        specs.append(("fused",))
    compiled = [True, False] if device.type == "cpu" and tt_kernel.kernel() is not None else [False]
    for fmt in ("ttm", "tt"):
        if fmt in wanted:
            specs += [("tt", fmt, c, "sgd") for c in compiled]
    if "ttm" in wanted:
        specs.append(("tt", "ttm", compiled[0], "rowwise_adagrad"))
    return specs


def _build(spec: tuple, case: dict, rank: int, device: torch.device) -> Variant:
    rows, dim, batch = case["rows"], case["dim"], case["batch"]
    ids = batch_ids(rows, batch, case["ids"], device)
    offsets = torch.arange(batch, device=device)
    # the gradient an upstream network hands back: dense (a loss of .sum() would hand a stride-0 one)
    grad = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1)).to(device)
    if spec[0] == "plain":
        return _plain_variant(rows, dim, ids, offsets, grad, device)
    if spec[0] == "fused":
        return _fused_variant(rows, dim, ids, batch, grad, device)
    _, fmt, compiled, optimizer = spec
    return _tt_variant(fmt, rows, dim, rank, ids, offsets, grad, device, compiled, optimizer)


def _worker(conn, spec: tuple, case: dict, config: dict, device: str) -> None:
    """One variant in its own process: build, size the block (about min_block_s), then time a
    block whenever the parent asks, until it sends None."""
    torch.set_num_threads(config["threads"])
    try:
        v = _build(spec, case, config["rank"], torch.device(device))
        v.block()  # warm up
        v.calls = max(1, min(200, math.ceil(config["min_block_s"] / max(v.block(), 1e-9))))
        conn.send((v.label, v.params))
        while conn.recv() is not None:
            conn.send(v.block())
    except Exception as exc:  # the parent names the variant and re-raises
        conn.send(exc)
    finally:
        conn.close()


def _case(case: dict, config: dict, device: torch.device) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    workers = []
    saved_env = {k: os.environ.get(k) for k in ALLOCATOR_ENV}
    os.environ.update(ALLOCATOR_ENV)  # spawned workers start with it
    try:
        for spec in _variant_specs(case, device):  # built one after another: peak memory of one table build
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, spec, case, config, str(device)), daemon=True)
            process.start()
            child.close()
            workers.append((parent, process, _answer(parent, spec), []))
        for _ in range(config["repeats"]):
            for conn, _, (label, _params), times in workers:
                conn.send("block")
                times.append(_answer(conn, label))
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for conn, process, _, _ in workers:
            try:
                conn.send(None)
            except OSError:
                pass
            process.join(timeout=30)
    ids = batch_ids(case["rows"], case["batch"], case["ids"], "cpu")
    distinct = int(torch.unique(ids).numel())
    rows = []
    for _, _, (label, params), times in workers:
        seconds = statistics.median(times)
        rows.append({
            "rows": case["rows"], "dim": case["dim"], "batch": case["batch"], "ids": case["ids"], "distinct_ids": distinct,
            "device": device.type, "variant": label, "params": params, "compression": case["rows"] * case["dim"] / params,
            "ms_per_batch": seconds * 1e3, "lookups_per_s": case["batch"] / seconds,
            "spread": (max(times) - min(times)) / seconds,
        })
    for reference in (REFERENCE, FUSED):
        ref = next((r for r in rows if r["variant"] == reference), None)
        for r in rows:
            r[f"vs_{'sparse_bag' if reference == REFERENCE else 'torchrec_fused'}"] = (
                r["lookups_per_s"] / ref["lookups_per_s"] if ref else None)
    return rows


def _answer(conn, what):
    answer = conn.recv()
    if isinstance(answer, Exception):
        raise RuntimeError(f"tables benchmark: variant {what!r} failed: {answer!r}") from answer
    return answer


def _markdown(rows: list[dict], config: dict) -> str:
    lines = []
    keys = dict.fromkeys((r["rows"], r["dim"], r["batch"], r["ids"], r["device"]) for r in rows)
    for key in keys:
        n, d, b, ids, dev = key
        case = [r for r in rows if (r["rows"], r["dim"], r["batch"], r["ids"], r["device"]) == key]
        lines += [
            f"Table {n:,} × {d} on {dev}, batch {b:,} bags of one id ({ids} ids, {case[0]['distinct_ids']:,} distinct), "
            f"forward + backward + update, {config['threads']} thread(s):",
            "",
            "| variant | params | compression | ms / batch | lookups / s | ÷ sparse bag | ÷ TorchRec fused |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in case:
            ratio = lambda x: "-" if x is None else f"{x:.2f}×"  # noqa: E731
            lines.append(
                f"| {r['variant']} | {r['params']:,} | {r['compression']:,.0f}× | {r['ms_per_batch']:.2f} | "
                f"{r['lookups_per_s']:,.0f} | {ratio(r['vs_sparse_bag'])} | {ratio(r['vs_torchrec_fused'])} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def run(quick: bool = False, device: str = "cpu") -> dict:
    config = QUICK if quick else FULL
    before = torch.get_num_threads()
    torch.set_num_threads(config["threads"])
    try:
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        rows = []
        for case in config["cases"]:
            rows += _case(case, config, torch.device(device))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        note = (f"_torch threads {config['threads']}; load average {load_before:.1f} before, {load:.1f} after "
                f"(other processes share the machine: compare rows within a table, not across runs)._")
        return {"rows": rows, "markdown": _markdown(rows, config) + "\n\n" + note, "meta": {"config": config}}
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = run(args.quick, args.device)
    print(result["markdown"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
