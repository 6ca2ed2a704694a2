"""TorchRec sharding for `TTEmbeddingBagCollection`: tables placed table-wise across ranks.

`DistributedModelParallel(model, sharders=[TTEmbeddingBagCollectionSharder(), ...], plan=...)`
replaces every `TTEmbeddingBagCollection` in the model by a `ShardedTTEmbeddingBagCollection`:

- TABLE_WISE tables (the TT tables, and plain ones if the plan says so) live only on their owner
  rank. TorchRec's own table-wise building blocks move the data: `TwSparseFeaturesDist` (KJT
  all-to-all) sends every feature to the rank that owns its table, the owner computes the pooled
  embeddings with the table's own module (`FactorizedEmbeddingBag`: the TT lookup, never a dense
  table; or `nn.EmbeddingBag`), and `TwPooledEmbeddingDist` (pooled all-to-all) returns them to the
  ranks the samples came from. The sharding classes are TorchRec's `TwPooledEmbeddingSharding` /
  `DpPooledEmbeddingSharding` with `create_lookup` overridden: that is the one place TorchRec puts
  its kernels (FBGEMM TBE), and the one place the TT lookup goes.
- DATA_PARALLEL tables are replicated; their lookup is local and their gradients are averaged by
  the DDP wrapper DMP puts around everything the sharded modules do not claim.

Gradients and optimizer. Table-wise parameters are model parallel: they exist on one rank, their
gradients arrive there through the backward of the pooled all-to-all (which, with TorchRec's
default `set_gradient_division(True)`, divides by the world size, so the gradient equals that of
the mean loss over the global batch, the same scale DDP gives the dense parameters). They are
ordinary `nn.Parameter`s (TorchRec's CUSTOMIZED_KERNEL: no FBGEMM table, no fused optimizer), reported by
`sharded_parameter_names` so DMP keeps them out of DDP, and returned by `DMP.parameters()` on their
owner: a plain torch optimizer over `model.parameters()` on each rank updates its own tables and
the replicated dense part. `fused_optimizer` is empty for these tables.

State dict keys of the tables a rank holds are those of the unsharded collection
(`embedding_bags.<table>.weight.factors.<i>`, `embedding_bags.<table>.weight.mask_<k>`, ...), so
each rank's part loads into an unsharded model; the owned modules are the unsharded collection's
own module objects, moved to the device (workers.DistributedTrainer relies on it to put the
trained tables back into the full model).

A plan may give table-wise tables TorchRec's CUSTOMIZED_KERNEL (what the planner and
`planning.py` use) or DENSE (what `torchrec.distributed.sharding_plan.table_wise` defaults to):
both mean the tables' own modules with autograd. Not supported: row/column-wise sharding (a TT
table is not a slab of rows), shared features, variable batch per feature, feature processors.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Type

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_sharding import (
    EmbeddingSharding,
    EmbeddingShardingContext,
    EmbeddingShardingInfo,
    KJTListSplitsAwaitable,
)
from torchrec.distributed.embedding_types import (
    EmbeddingComputeKernel,
    GroupedEmbeddingConfig,
    KJTList,
    ShardedEmbeddingModule,
)
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionContext
from torchrec.distributed.sharding.dp_sharding import DpPooledEmbeddingSharding
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ModuleSharder,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.modules.embedding_configs import EmbeddingTableConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ranksearch.models.tensorized.collection import PooledLookup, TTEmbeddingBagCollection
from ranksearch.models.tensorized.layers import FactorizedEmbeddingBag

__all__ = [
    "KERNEL_BY_SHARDING_TYPE",
    "SUPPORTED_SHARDING_TYPES",
    "ShardedTTEmbeddingBagCollection",
    "TTEmbeddingBagCollectionSharder",
    "TTPooledEmbeddingsLookup",
    "is_tt_table",
    "table_proxy",
]

SUPPORTED_SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.DATA_PARALLEL.value)
# The compute kernel TorchRec records per table. Table-wise: CUSTOMIZED_KERNEL, TorchRec's name for a
# kernel a sharded module brings itself (the planner rejects DENSE outside data parallel, and FUSED
# means FBGEMM's TBE). Data parallel: DENSE, as TorchRec's own replicated tables. Either way the
# tables are plain parameters trained with autograd by the caller's optimizer.
KERNEL_BY_SHARDING_TYPE = {
    ShardingType.TABLE_WISE.value: EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value,
    ShardingType.DATA_PARALLEL.value: EmbeddingComputeKernel.DENSE.value,
}
# What a plan may say: also DENSE for table-wise (torchrec's `table_wise(rank=...)` default), which
# names the same thing, the unfused autograd lookup.
ACCEPTED_KERNELS = frozenset({EmbeddingComputeKernel.DENSE.value, EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value})


def is_tt_table(bag: nn.Module) -> bool:
    return isinstance(bag, FactorizedEmbeddingBag)


def table_proxy(bag: nn.Module, num_embeddings: int, embedding_dim: int) -> torch.Tensor:
    """The (rows, dim) tensor TorchRec's planner and sharding infos see for one table.

    Plain tables: the weight itself. Factorized tables have no such tensor (that is the point), so
    a meta tensor of the logical shape stands in: it allocates nothing, and gives the planner the
    shapes it sizes inputs, outputs and shards by; planning.py replaces its dense-size storage
    and gather-cost estimates by the factorized ones.
    """
    if isinstance(bag, nn.EmbeddingBag):
        return bag.weight
    return torch.empty((num_embeddings, embedding_dim), device="meta")


# ---- the lookup: where TorchRec would call FBGEMM, the table modules are called ----------------


class TTPooledEmbeddingsLookup(nn.Module):
    """Pooled lookups of the tables of one sharding on this rank, in TorchRec's grouped order.

    The input KJT holds this rank's features in the order of `grouped_configs` (what the input
    dist delivers); the output is (batch, sum of dims) with one column block per feature, in the
    same order (what the output dist expects): the collection's own `PooledLookup` over those
    tables. The table modules belong to the sharded collection's `embedding_bags`.
    """

    def __init__(self, grouped_configs: List[GroupedEmbeddingConfig], bags: Dict[str, nn.Module]) -> None:
        super().__init__()
        tables = [(t.name, list(t.feature_names)) for config in grouped_configs for t in config.embedding_tables]
        self._pooled = PooledLookup(tables, bags)

    @property
    def table_names(self) -> List[str]:
        return self._pooled.table_names

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if not self.table_names:
            # a rank that owns no table of this sharding still takes part in the all-to-all
            # (as TorchRec's own lookup: an empty tensor that can carry a gradient)
            return torch.empty([0], device=features.values().device, requires_grad=True)
        return self._pooled(features)


class _TTLookupMixin:
    """`create_lookup` returning the TT/plain-module lookup instead of FBGEMM's TBE lookup."""

    _tt_bags: Dict[str, nn.Module]

    def create_lookup(self, device=None, fused_params=None, feature_processor=None) -> nn.Module:
        if feature_processor is not None:
            raise NotImplementedError("feature processors are not supported for TT embedding collections")
        owned = {t.name for g in self._grouped_embedding_configs for t in g.embedding_tables}
        return TTPooledEmbeddingsLookup(
            self._grouped_embedding_configs, {name: self._tt_bags[name] for name in owned}
        )


class TTTwPooledEmbeddingSharding(_TTLookupMixin, TwPooledEmbeddingSharding):
    """TorchRec's table-wise pooled sharding (KJT all-to-all in, pooled all-to-all out) with the
    tables' own modules as the lookup kernel."""

    def __init__(self, sharding_infos, env, device=None, qcomm_codecs_registry=None, *, bags) -> None:
        super().__init__(sharding_infos, env, device, qcomm_codecs_registry=qcomm_codecs_registry)
        self._tt_bags = bags


class TTDpPooledEmbeddingSharding(_TTLookupMixin, DpPooledEmbeddingSharding):
    """TorchRec's data-parallel pooled sharding (no communication; DDP averages gradients) with the
    tables' own modules as the lookup kernel."""

    def __init__(self, sharding_infos, env, device=None, *, bags) -> None:
        super().__init__(sharding_infos, env, device)
        self._tt_bags = bags


# ---- output ------------------------------------------------------------------------------------


class _CollectionAwaitable(LazyAwaitable[KeyedTensor]):
    """Waits for each sharding's output dist, then lays the columns out in the unsharded order."""

    def __init__(self, awaitables, column_order: Optional[torch.Tensor], keys: List[str], lengths: List[int]) -> None:
        super().__init__()
        self._awaitables = awaitables
        self._column_order = column_order
        self._keys, self._lengths = keys, lengths

    def _wait_impl(self) -> KeyedTensor:
        embeddings = [w.wait() for w in self._awaitables]
        values = embeddings[0] if len(embeddings) == 1 else torch.cat(embeddings, dim=1)
        if self._column_order is not None:
            values = values.index_select(1, self._column_order.to(values.device))
        return KeyedTensor(keys=self._keys, length_per_key=self._lengths, values=values, key_dim=1)


# ---- the sharded module ------------------------------------------------------------------------


class ShardedTTEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, EmbeddingBagCollectionContext]
):
    """Sharded `TTEmbeddingBagCollection`: same forward (`KJT -> KeyedTensor`, same keys and
    column order), tables spread over ranks as the plan says. See the module docstring."""

    def __init__(
        self,
        module: TTEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._module_fqn = module_fqn
        self._env = env
        self._device = device if device is not None else torch.device("cpu")
        self._configs = list(module.embedding_bag_configs())
        self.module_sharding_plan = {
            name: ps for name, ps in table_name_to_parameter_sharding.items()
            if name in {c.name for c in self._configs}
        }
        self._check_features()
        infos_by_type = self._sharding_infos(module)
        self._place_tables(module, env)
        self._create_shardings(infos_by_type, env)
        self._column_order = self._output_column_order()

    # -- construction, step by step (as TorchRec's ShardedEmbeddingBagCollection) ----------------

    def _check_features(self) -> None:
        """One table per feature (shared features are not supported)."""
        feature_owner: Dict[str, str] = {}
        for config in self._configs:
            for feature in config.feature_names:
                if feature in feature_owner:
                    raise ValueError(
                        f"feature {feature!r} is used by tables {feature_owner[feature]!r} and {config.name!r}: "
                        "shared features are not supported"
                    )
                feature_owner[feature] = config.name
        self._feature_names = [f for c in self._configs for f in c.feature_names]
        self._feature_dims = [c.embedding_dim for c in self._configs for _ in c.feature_names]

    def _check_parameter_sharding(self, name: str) -> ParameterSharding:
        ps = self.module_sharding_plan.get(name)
        if ps is None:
            raise ValueError(f"plan: no ParameterSharding for table {name!r}")
        if ps.sharding_type not in SUPPORTED_SHARDING_TYPES:
            raise ValueError(
                f"plan: table {name!r} has sharding type {ps.sharding_type!r}; "
                f"TT embedding collections support {', '.join(SUPPORTED_SHARDING_TYPES)}"
            )
        if ps.compute_kernel not in ACCEPTED_KERNELS:
            raise ValueError(
                f"plan: table {name!r} ({ps.sharding_type}) has compute kernel {ps.compute_kernel!r}; "
                f"TT embedding collections compute with the tables' own modules: use "
                f"{KERNEL_BY_SHARDING_TYPE[ps.sharding_type]!r} (plain parameters, optimizer outside)"
            )
        if ps.sharding_type == ShardingType.TABLE_WISE.value and (not ps.ranks or len(ps.ranks) != 1):
            raise ValueError(f"plan: table-wise table {name!r} needs exactly one rank, got {ps.ranks}")
        return ps

    def _sharding_infos(self, module: TTEmbeddingBagCollection) -> Dict[str, List[EmbeddingShardingInfo]]:
        """TorchRec's per-table sharding infos, grouped by sharding type (plan checked on the way)."""
        infos_by_type: Dict[str, List[EmbeddingShardingInfo]] = OrderedDict()
        for config in self._configs:
            ps = self._check_parameter_sharding(config.name)
            bag = module.embedding_bags[config.name]
            infos_by_type.setdefault(ps.sharding_type, []).append(
                EmbeddingShardingInfo(
                    embedding_config=EmbeddingTableConfig(
                        num_embeddings=config.num_embeddings,
                        embedding_dim=config.embedding_dim,
                        name=config.name,
                        data_type=config.data_type,
                        feature_names=list(config.feature_names),
                        pooling=config.pooling,
                        is_weighted=module.is_weighted(),
                        has_feature_processor=False,
                        embedding_names=list(config.feature_names),
                        weight_init_max=config.weight_init_max,
                        weight_init_min=config.weight_init_min,
                    ),
                    param_sharding=ps,
                    param=table_proxy(bag, config.num_embeddings, config.embedding_dim),
                    fused_params={},
                )
            )
        return infos_by_type

    def _place_tables(self, module: TTEmbeddingBagCollection, env: ShardingEnv) -> None:
        """Keep the tables that live here: table-wise ones this rank owns, every data-parallel one
        (replicas start equal: broadcast from rank 0, as DDP would)."""
        local: List[str] = []
        self._model_parallel_tables: List[str] = []
        self._data_parallel_tables: List[str] = []
        for config in self._configs:
            ps = self.module_sharding_plan[config.name]
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
                local.append(config.name)
                self._data_parallel_tables.append(config.name)
            elif ps.ranks[0] == env.rank:
                local.append(config.name)
                self._model_parallel_tables.append(config.name)
        self.embedding_bags = nn.ModuleDict({name: module.embedding_bags[name].to(self._device) for name in local})
        if self._data_parallel_tables and env.world_size > 1 and dist.is_initialized():
            with torch.no_grad():
                for name in self._data_parallel_tables:
                    for tensor in self.embedding_bags[name].state_dict(keep_vars=True).values():
                        dist.broadcast(tensor.data, src=0, group=env.process_group)

    def _create_shardings(self, infos_by_type: Dict[str, List[EmbeddingShardingInfo]], env: ShardingEnv) -> None:
        """TorchRec's table-wise / data-parallel shardings with our lookup, and their lookups and output dists."""
        bags = dict(self.embedding_bags.items())
        self._sharding_types: List[str] = list(infos_by_type)
        self._embedding_shardings: List[EmbeddingSharding] = []
        for sharding_type, infos in infos_by_type.items():
            if sharding_type == ShardingType.TABLE_WISE.value:
                sharding = TTTwPooledEmbeddingSharding(
                    infos, env, self._device, qcomm_codecs_registry=self.qcomm_codecs_registry, bags=bags
                )
            else:
                sharding = TTDpPooledEmbeddingSharding(infos, env, self._device, bags=bags)
            self._embedding_shardings.append(sharding)
        self._lookups = [sharding.create_lookup() for sharding in self._embedding_shardings]
        self._output_dists = [sharding.create_output_dist(device=self._device) for sharding in self._embedding_shardings]
        self._input_dists = []
        self._feature_splits: List[int] = []
        self._features_order: Optional[List[int]] = None
        self._input_keys: Optional[List[str]] = None

    def _output_column_order(self) -> Optional[torch.Tensor]:
        """Output columns come sharding by sharding (TorchRec's order); this maps them to the
        unsharded collection's order (None when they already are)."""
        sharded_names = [n for s in self._embedding_shardings for n in s.embedding_names()]
        sharded_dims = [d for s in self._embedding_shardings for d in s.embedding_dims()]
        start, offsets = 0, {}
        for name, dim in zip(sharded_names, sharded_dims):
            offsets[name] = (start, dim)
            start += dim
        order = [i for name in self._feature_names for i in range(offsets[name][0], offsets[name][0] + offsets[name][1])]
        return None if order == list(range(len(order))) else torch.tensor(order, dtype=torch.long)

    # -- the ShardedModule contract --------------------------------------------------------------

    def create_context(self) -> EmbeddingBagCollectionContext:
        return EmbeddingBagCollectionContext()

    def _create_input_dist(self, input_feature_names: List[str]) -> None:
        names: List[str] = []
        for sharding in self._embedding_shardings:
            self._input_dists.append(sharding.create_input_dist())
            names.extend(sharding.feature_names())
            self._feature_splits.append(len(sharding.feature_names()))
        if sorted(names) != sorted(input_feature_names):
            raise ValueError(
                f"features: expected the keys {sorted(names)} of the collection's tables, got {sorted(input_feature_names)}"
            )
        self._features_order = None if names == list(input_feature_names) else [
            input_feature_names.index(f) for f in names
        ]
        self._input_keys = list(input_feature_names)

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        if features.variable_stride_per_key():
            raise NotImplementedError("variable batch size per feature is not supported for TT embedding collections")
        keys = list(features.keys())
        if self._input_keys is None:
            self._create_input_dist(keys)
        elif keys != self._input_keys:
            raise ValueError(f"features: keys changed from {self._input_keys} to {keys} between batches")
        with torch.no_grad():
            if self._features_order is not None:
                features = features.permute(self._features_order)
            awaitables = []
            for input_dist, part in zip(self._input_dists, features.split(self._feature_splits)):
                awaitables.append(input_dist(part))
                ctx.sharding_contexts.append(
                    EmbeddingShardingContext(
                        batch_size_per_feature_pre_a2a=part.stride_per_key(),
                        variable_batch_per_feature=False,
                    )
                )
        return KJTListSplitsAwaitable(awaitables, ctx, self._module_fqn, self._sharding_types)

    def compute(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        return [lookup(features) for lookup, features in zip(self._lookups, dist_input)]

    def output_dist(self, ctx: EmbeddingBagCollectionContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        awaitables = [dist_(emb, sctx) for dist_, sctx, emb in zip(self._output_dists, ctx.sharding_contexts, output)]
        return _CollectionAwaitable(awaitables, self._column_order, self._feature_names, self._feature_dims)

    def compute_and_output_dist(self, ctx: EmbeddingBagCollectionContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        awaitables = []
        for lookup, dist_, sctx, features in zip(self._lookups, self._output_dists, ctx.sharding_contexts, input):
            awaitables.append(dist_(lookup(features), sctx))  # each output dist starts as soon as its lookup is done
        return _CollectionAwaitable(awaitables, self._column_order, self._feature_names, self._feature_dims)

    # -- what DMP asks about parameters ----------------------------------------------------------

    def sharded_parameter_names(self, prefix: str = "") -> Any:
        """Parameters DMP must keep out of DDP: those of the table-wise tables this rank owns.
        Data-parallel tables are left to DDP, which averages their gradients."""
        for name in self._model_parallel_tables:
            for key, _ in self.embedding_bags[name].named_parameters(prefix=f"{prefix}{'.' if prefix else ''}embedding_bags.{name}"):
                yield key

    # -- introspection ---------------------------------------------------------------------------

    @property
    def table_owner(self) -> Dict[str, Optional[int]]:
        """table -> owner rank (None for data-parallel tables)."""
        return {
            c.name: (None if self.module_sharding_plan[c.name].sharding_type == ShardingType.DATA_PARALLEL.value
                     else self.module_sharding_plan[c.name].ranks[0])
            for c in self._configs
        }

    @property
    def local_tables(self) -> List[str]:
        return list(self.embedding_bags.keys())

    @property
    def model_parallel_tables(self) -> List[str]:
        return list(self._model_parallel_tables)

    @property
    def data_parallel_tables(self) -> List[str]:
        return list(self._data_parallel_tables)

    def embedding_bag_configs(self):
        return self._configs

    def is_weighted(self) -> bool:
        return False

    @property
    def fused_optimizer(self):  # TT tables are trained by the caller's optimizer
        from torchrec.optim.keyed import CombinedOptimizer

        return CombinedOptimizer([])

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)  # lookups own no modules; the tables are in embedding_bags
        return self

    @property
    def unsharded_module_type(self) -> Type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def extra_repr(self) -> str:
        owners = ", ".join(f"{t}@{'dp' if r is None else r}" for t, r in self.table_owner.items())
        return f"rank={self._env.rank}, tables=[{owners}]"


class TTEmbeddingBagCollectionSharder(ModuleSharder[TTEmbeddingBagCollection]):
    """`ModuleSharder` for `TTEmbeddingBagCollection`: table-wise (every table) and data-parallel;
    the lookup is the tables' own modules, trained by the caller's optimizer (`KERNEL_BY_SHARDING_TYPE`)."""

    def __init__(self, qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)

    def shard(
        self,
        module: TTEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedTTEmbeddingBagCollection:
        return ShardedTTEmbeddingBagCollection(
            module, params, env, device, qcomm_codecs_registry=self.qcomm_codecs_registry, module_fqn=module_fqn
        )

    @property
    def module_type(self) -> Type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def shardable_parameters(self, module: TTEmbeddingBagCollection) -> Dict[str, torch.Tensor]:
        """table -> (rows, dim) tensor: the weight of plain tables, a meta stand-in for TT tables."""
        return {
            c.name: table_proxy(module.embedding_bags[c.name], c.num_embeddings, c.embedding_dim)
            for c in module.embedding_bag_configs()
        }

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(SUPPORTED_SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        kernel = KERNEL_BY_SHARDING_TYPE.get(sharding_type)
        return [kernel] if kernel else []
