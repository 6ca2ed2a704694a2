"""Sharding plans for models holding `TTEmbeddingBagCollection`s.

Two ways to a real TorchRec `ShardingPlan` (both give `ParameterSharding`s with an
`EnumerableShardingSpec`, DMP takes either):

1. `plan_sharding(model, world_size=...)`: TorchRec's own `EmbeddingShardingPlanner`
   (enumerator, proposers, GreedyPerfPartitioner), planning TT tables together with plain ones, made
   to see TT tables as they are through its documented extension points:
   - `ParameterConstraints` per TT table: sharding type TABLE_WISE only, with TorchRec's
     CUSTOMIZED_KERNEL (the TT module is the kernel; FBGEMM's fused TBE cannot hold a factorized
     table). Plain tables of TT collections may also go DATA_PARALLEL (DENSE kernel).
   - `TTStorageEstimator` (a `ShardEstimator`): TorchRec sizes a table as rows x dim x 4 bytes; for a
     TT table that is the size of the table it replaces (gigabytes for Criteo). It keeps TorchRec's
     input/output buffer estimate and replaces the table part by the bytes of the factors plus
     optimizer state: memory-light.
   - `TTPerfEstimator`: TorchRec's estimate is a row gather (memory bandwidth); a TT row costs a
     chain of small matrix products (`FactorizedEmbeddingBag.flops`). It adds that compute, forward
     and backward (x `bwd_compute_multiplier`), per looked-up row: compute-heavy.
   The partitioner then balances TT tables across ranks by compute, with tiny storage, so two TT
   tables of similar size land on different ranks.

2. `balanced_table_wise_plan(model, world_size=...)`: a small deterministic plan builder (longest
   processing time first over the same cost model) for every table of every TT collection, via
   TorchRec's `construct_module_sharding_plan` + `table_wise(rank=...)`. Useful when the planner's
   search is not wanted (tests, reproducible placements) and as a reference for what the planner
   should find.

`table_placement(plan)` reads back {module path: {table: rank or "data_parallel"}}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE, BWD_COMPUTE_MULTIPLIER
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.types import ParameterConstraints, Perf, ShardingOption, Storage
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from ranksearch.models.tensorized.collection import TTEmbeddingBagCollection

from .sharder import KERNEL_BY_SHARDING_TYPE, TTEmbeddingBagCollectionSharder, is_tt_table

__all__ = [
    "TTPerfEstimator",
    "TTStorageEstimator",
    "TTTableInfo",
    "balanced_table_wise_plan",
    "default_sharders",
    "make_planner",
    "plan_sharding",
    "table_placement",
    "tt_constraints",
    "tt_tables",
]

# Cost of one TT row (forward): ROW_OVERHEAD_MS + 2 * flops_per_row / TT_FLOPS_PER_MS, backward
# `bwd_compute_multiplier` (2) times that. CPU figures measured here (one thread, FactorizedEmbeddingBag
# forward+backward on 2048 ids; 3000x8 rank 4: 4 us/row, 10^7x128 TTM rank 16: 17 us/row). GPU
# figures are placeholders (not measured: no TorchRec build on the lent GPU machine) - the
# partitioner only needs the ratios between tables and against the row-gather estimate.
TT_FLOPS_PER_MS = {"cpu": 2.5e6, "cuda": 2e8, "mtia": 2e8}
ROW_OVERHEAD_MS = {"cpu": 1.3e-3, "cuda": 1e-5, "mtia": 1e-5}
DEFAULT_POOLING_FACTOR = 1.0  # ids per sample and feature (Criteo: exactly one)
_TW_KERNEL = KERNEL_BY_SHARDING_TYPE[ShardingType.TABLE_WISE.value]
_DENSE_KERNEL = EmbeddingComputeKernel.DENSE.value


@dataclass(frozen=True)
class TTTableInfo:
    path: str  # module path of the collection
    name: str
    num_embeddings: int
    embedding_dim: int
    num_features: int
    is_tt: bool
    stored_params: int  # entries actually stored (factors, or the dense weight)
    flops_per_row: int  # multiply-adds to compute one row (0 for plain tables)

    @property
    def dense_params(self) -> int:
        return self.num_embeddings * self.embedding_dim


def default_sharders() -> List[ModuleSharder[nn.Module]]:
    """The sharders a DLRM with TT collections (and possibly plain EBCs) needs."""
    return [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]


def _collections(model: nn.Module):
    for path, module in model.named_modules():
        if isinstance(module, TTEmbeddingBagCollection):
            yield path, module


def tt_tables(model: nn.Module) -> Dict[str, TTTableInfo]:
    """table name -> TTTableInfo for every table of every TTEmbeddingBagCollection in `model`."""
    out: Dict[str, TTTableInfo] = {}
    for path, collection in _collections(model):
        for config in collection.embedding_bag_configs():
            bag = collection.embedding_bags[config.name]
            if config.name in out:
                raise ValueError(f"table name {config.name!r} appears twice; TorchRec plans tables by name")
            tt = is_tt_table(bag)
            out[config.name] = TTTableInfo(
                path=path, name=config.name, num_embeddings=config.num_embeddings,
                embedding_dim=config.embedding_dim, num_features=len(config.feature_names), is_tt=tt,
                stored_params=sum(p.numel() for p in bag.parameters()),
                flops_per_row=int(bag.flops(1)) if tt else 0,
            )
    return out


def tt_constraints(
    model: nn.Module,
    *,
    pooling_factors: Optional[Dict[str, float]] = None,
    base: Optional[Dict[str, ParameterConstraints]] = None,
    allow_data_parallel_plain: bool = True,
) -> Dict[str, ParameterConstraints]:
    """ParameterConstraints for the tables of TT collections (merged over `base`, which wins).

    TT tables: TABLE_WISE (CUSTOMIZED_KERNEL). Plain tables of TT collections: TABLE_WISE or (if
    allowed) DATA_PARALLEL (DENSE kernel). `pooling_factors` (ids per sample, per table) feed the
    planner's input size and compute estimates.
    """
    constraints: Dict[str, ParameterConstraints] = {}
    for name, info in tt_tables(model).items():
        types = [ShardingType.TABLE_WISE.value]
        if not info.is_tt and allow_data_parallel_plain:
            types.append(ShardingType.DATA_PARALLEL.value)
        pf = (pooling_factors or {}).get(name, DEFAULT_POOLING_FACTOR)
        constraints[name] = ParameterConstraints(
            sharding_types=types, compute_kernels=[KERNEL_BY_SHARDING_TYPE[t] for t in types],
            pooling_factors=[pf] * info.num_features,
        )
    constraints.update(base or {})
    return constraints


def tt_row_ms(flops_per_row: int, flops_per_ms: float, row_overhead_ms: float) -> float:
    """Forward milliseconds to compute one TT row."""
    return row_overhead_ms + 2.0 * flops_per_row / flops_per_ms


def _in_tt_collection(option: ShardingOption) -> bool:
    return isinstance(option.module[1], TTEmbeddingBagCollection)


def _tt_info(option: ShardingOption, cache: Dict[int, Dict[str, TTTableInfo]]) -> Optional[TTTableInfo]:
    """The TTTableInfo of a sharding option's table if it is a factorized table of a TT collection."""
    _, module = option.module
    if not isinstance(module, TTEmbeddingBagCollection):
        return None
    infos = cache.get(id(module))
    if infos is None:
        holder = nn.Module()
        holder.c = module
        infos = cache[id(module)] = tt_tables(holder)
    info = infos.get(option.name)
    return info if info is not None and info.is_tt else None


class TTStorageEstimator(EmbeddingStorageEstimator):
    """TorchRec's storage estimate, with the table part of TT tables replaced by the factors.

    TorchRec's shard storage = input/output buffers + table bytes (rows x dim x element size, x the
    optimizer's multiplier). For a TT table the table bytes become factor entries x 4 bytes x
    (1 + `optimizer_state_multiplier`): the factors are plain parameters trained by a torch
    optimizer on their owner (Adam keeps two states per entry: the default 2).
    """

    def __init__(self, topology: Topology, constraints=None, *, optimizer_state_multiplier: float = 2.0, **kwargs) -> None:
        super().__init__(topology=topology, constraints=constraints, **kwargs)
        self._optimizer_state_multiplier = optimizer_state_multiplier

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map=None) -> None:
        super().estimate(sharding_options, sharder_data_map=sharder_data_map)
        cache: Dict[int, Dict[str, TTTableInfo]] = {}
        device = self._topology.compute_device
        for option in sharding_options:
            info = _tt_info(option, cache)
            if info is None:
                continue
            element = option.tensor.element_size()
            full = info.dense_params * element
            tt_bytes = math.ceil(info.stored_params * 4 * (1 + self._optimizer_state_multiplier))
            for shard in option.shards:
                if shard.storage is None:
                    continue
                fraction = 1.0 if option.sharding_type == ShardingType.DATA_PARALLEL.value else (
                    math.prod(shard.size) / info.dense_params
                )
                dense_part = math.ceil(full * fraction)
                tt_part = math.ceil(tt_bytes * fraction)
                hbm, ddr = shard.storage.hbm, shard.storage.ddr
                if device in {"cuda", "mtia"}:
                    hbm = max(0, hbm - dense_part) + tt_part
                else:
                    ddr = max(0, ddr - dense_part) + tt_part
                shard.storage = Storage(hbm=hbm, ddr=ddr, ssd=shard.storage.ssd)


class TTPerfEstimator(EmbeddingPerfEstimator):
    """TorchRec's perf estimate plus the compute of building rows from TT cores.

    Per shard and iteration a TT table computes one row per looked-up id: batch x pooling factor x
    features ids on the owner (table-wise: the batch of every rank). Each row costs a fixed
    overhead plus `flops_per_row` multiply-adds (2 FLOP) at `flops_per_ms` forward, and
    `bwd_compute_multiplier` times that backward (defaults by device: `TT_FLOPS_PER_MS`,
    `ROW_OVERHEAD_MS`).
    """

    def __init__(self, topology: Topology, constraints=None, *, flops_per_ms: Optional[float] = None,
                 row_overhead_ms: Optional[float] = None, **kwargs) -> None:
        super().__init__(topology=topology, constraints=constraints, **kwargs)
        device = topology.compute_device
        self._flops_per_ms = flops_per_ms or TT_FLOPS_PER_MS.get(device, TT_FLOPS_PER_MS["cpu"])
        self._row_ms = ROW_OVERHEAD_MS.get(device, ROW_OVERHEAD_MS["cpu"]) if row_overhead_ms is None else row_overhead_ms
        self._bwd_multiplier = getattr(topology, "bwd_compute_multiplier", BWD_COMPUTE_MULTIPLIER)

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map=None) -> None:
        # TorchRec has no bandwidth figure for CUSTOMIZED_KERNEL: estimate the gather, pooling and
        # communication part as for its DENSE kernel (unfused row reads), then add the TT compute.
        swapped = [o for o in sharding_options if o.compute_kernel == _TW_KERNEL and _in_tt_collection(o)]
        for option in swapped:
            option.compute_kernel = _DENSE_KERNEL
        try:
            super().estimate(sharding_options, sharder_data_map=sharder_data_map)
        finally:
            for option in swapped:
                option.compute_kernel = _TW_KERNEL
        cache: Dict[int, Dict[str, TTTableInfo]] = {}
        world = self._topology.world_size
        for option in sharding_options:
            info = _tt_info(option, cache)
            if info is None:
                continue
            pooling = sum(option.input_lengths)  # ids per sample over the table's features
            ranks_batches = world if option.sharding_type == ShardingType.TABLE_WISE.value else 1
            rows = option.batch_size * ranks_batches * pooling
            fwd = rows * tt_row_ms(info.flops_per_row, self._flops_per_ms, self._row_ms)
            for shard in option.shards:
                if shard.perf is None:
                    continue
                p = shard.perf
                shard.perf = Perf(
                    fwd_compute=p.fwd_compute + fwd, fwd_comms=p.fwd_comms,
                    bwd_compute=p.bwd_compute + fwd * self._bwd_multiplier, bwd_comms=p.bwd_comms,
                    input_dist_comms=p.input_dist_comms, prefetch_compute=p.prefetch_compute,
                )


def make_planner(
    model: nn.Module,
    *,
    world_size: int,
    compute_device: str = "cpu",
    local_world_size: Optional[int] = None,
    batch_size: int = BATCH_SIZE,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    pooling_factors: Optional[Dict[str, float]] = None,
    optimizer_state_multiplier: float = 2.0,
    tt_flops_per_ms: Optional[float] = None,
    topology: Optional[Topology] = None,
) -> EmbeddingShardingPlanner:
    """An `EmbeddingShardingPlanner` that sees TT tables as compute-heavy and memory-light."""
    topology = topology or Topology(
        world_size=world_size, compute_device=compute_device, local_world_size=local_world_size or world_size
    )
    constraints = tt_constraints(model, pooling_factors=pooling_factors, base=constraints)
    estimators = [
        TTPerfEstimator(topology, constraints, flops_per_ms=tt_flops_per_ms),
        TTStorageEstimator(topology, constraints, optimizer_state_multiplier=optimizer_state_multiplier),
    ]
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator

    enumerator = EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=constraints, estimator=estimators)
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, enumerator=enumerator, constraints=constraints, debug=False,
    )


def plan_sharding(
    model: nn.Module,
    *,
    world_size: int,
    compute_device: str = "cpu",
    sharders: Optional[List[ModuleSharder[nn.Module]]] = None,
    pg=None,
    **planner_kwargs,
) -> ShardingPlan:
    """Plan with TorchRec's planner (see `make_planner`). With a process group `pg`, rank 0 plans
    and broadcasts (`collective_plan`), so every rank gets the same plan."""
    planner = make_planner(model, world_size=world_size, compute_device=compute_device, **planner_kwargs)
    sharders = sharders or default_sharders()
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


def balanced_table_wise_plan(
    model: nn.Module,
    *,
    world_size: int,
    compute_device: str = "cpu",
    local_world_size: Optional[int] = None,
    batch_size: int = BATCH_SIZE,
    pooling_factors: Optional[Dict[str, float]] = None,
    tt_flops_per_ms: Optional[float] = None,
    sharder: Optional[TTEmbeddingBagCollectionSharder] = None,
) -> ShardingPlan:
    """Every table of every TT collection TABLE_WISE, placed longest-processing-time first.

    Cost of a table per iteration (ms, the same model as `TTPerfEstimator`): TT compute of its rows
    plus reading and sending its pooled output (rows x dim x 4 bytes at DDR bandwidth): TT tables
    dominate, plain tables fill in. Ties (and equal costs) go to the rank with the fewest stored
    parameters, then the lowest rank, so the plan is deterministic.
    """
    from torchrec.distributed.planner.constants import DDR_MEM_BW, HBM_MEM_BW

    sharder = sharder or TTEmbeddingBagCollectionSharder()
    flops_per_ms = tt_flops_per_ms or TT_FLOPS_PER_MS.get(compute_device, TT_FLOPS_PER_MS["cpu"])
    row_ms = ROW_OVERHEAD_MS.get(compute_device, ROW_OVERHEAD_MS["cpu"])
    bandwidth = HBM_MEM_BW if compute_device in {"cuda", "mtia"} else DDR_MEM_BW
    infos = tt_tables(model)

    def cost(info: TTTableInfo) -> float:
        pf = (pooling_factors or {}).get(info.name, DEFAULT_POOLING_FACTOR) * info.num_features
        rows = batch_size * world_size * pf
        compute = rows * tt_row_ms(info.flops_per_row, flops_per_ms, row_ms) * (1 + BWD_COMPUTE_MULTIPLIER) if info.is_tt else 0.0
        io = rows * info.embedding_dim * 4 * 3 / bandwidth
        return compute + io

    load = [0.0] * world_size
    stored = [0] * world_size
    owner: Dict[str, int] = {}
    for info in sorted(infos.values(), key=lambda i: (-cost(i), -i.stored_params, i.name)):
        rank = min(range(world_size), key=lambda r: (load[r], stored[r], r))
        owner[info.name] = rank
        load[rank] += cost(info)
        stored[rank] += info.stored_params

    plan: Dict[str, object] = {}
    for path, collection in _collections(model):
        names = [c.name for c in collection.embedding_bag_configs()]
        plan[path] = construct_module_sharding_plan(
            collection,
            {name: table_wise(rank=owner[name], compute_kernel=_TW_KERNEL) for name in names},
            sharder=sharder, local_size=local_world_size or world_size, world_size=world_size,
            device_type=compute_device,
        )
    return ShardingPlan(plan)


def table_placement(plan: ShardingPlan) -> Dict[str, Dict[str, object]]:
    """{module path: {table: owner rank, or "data_parallel", or the list of ranks}} of a plan."""
    out: Dict[str, Dict[str, object]] = {}
    for path, module_plan in plan.plan.items():
        tables: Dict[str, object] = {}
        for name, ps in module_plan.items():
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
                tables[name] = "data_parallel"
            elif ps.sharding_type == ShardingType.TABLE_WISE.value:
                tables[name] = ps.ranks[0]
            else:
                tables[name] = {"sharding_type": ps.sharding_type, "ranks": list(ps.ranks or [])}
        out[path] = tables
    return out
