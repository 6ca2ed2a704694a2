"""TorchRec sharding for TT embedding collections, and fits on k workers.

- `TTEmbeddingBagCollectionSharder` / `ShardedTTEmbeddingBagCollection` (sharder.py): DMP places
  the tables of a `TTEmbeddingBagCollection` table-wise (or data-parallel) across ranks.
- planning.py: `plan_sharding` (TorchRec's EmbeddingShardingPlanner with TT-aware estimators),
  `balanced_table_wise_plan`, `table_placement`.
- workers.py: `fit_distributed` (Ray Train TorchTrainer, one `fit` sharded over k workers).

Importing this package imports torchrec (seconds); `fit_distributed` is loaded on first use.
"""

from .planning import (
    TTPerfEstimator,
    TTStorageEstimator,
    TTTableInfo,
    balanced_table_wise_plan,
    default_sharders,
    make_planner,
    plan_sharding,
    table_placement,
    tt_constraints,
    tt_tables,
)
from .sharder import ShardedTTEmbeddingBagCollection, TTEmbeddingBagCollectionSharder, TTPooledEmbeddingsLookup

__all__ = [
    "ShardedTTEmbeddingBagCollection", "TTEmbeddingBagCollectionSharder", "TTPerfEstimator", "TTPooledEmbeddingsLookup",
    "TTStorageEstimator", "TTTableInfo", "balanced_table_wise_plan", "default_sharders", "fit_distributed",
    "make_planner", "plan_sharding", "table_placement", "tt_constraints", "tt_tables",
]


def __getattr__(name):
    if name == "fit_distributed":
        from .workers import fit_distributed

        return fit_distributed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
