"""TTEmbeddingBagCollection: TorchRec's EmbeddingBagCollection interface over factorized tables.

It duck-types `torchrec.EmbeddingBagCollection` (`embedding_bag_configs()`,
`forward(KeyedJaggedTensor) -> KeyedTensor`), so `torchrec.models.dlrm.DLRM` takes it
as is. Tables with at least `min_rows` rows are factorized (TT-Rec style; never
materialized), the others stay plain `nn.EmbeddingBag`s.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .layers import FactorizedEmbeddingBag
from .names import FORMATS

_POOLING = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


class PooledLookup:
    """Pooled lookups of some tables' features: KJT -> (batch, sum of dims), one column block per
    feature in the given order. Shared by `TTEmbeddingBagCollection` (all its tables) and the
    sharded collection (the tables of one sharding on one rank, in TorchRec's grouped order).
    Not a module: the tables belong to the caller's `embedding_bags` mapping, read at each call,
    so a table replaced there (tensorize, pruning, unsharding) is the one looked up.
    """

    def __init__(self, tables: list[tuple[str, list[str]]], bags):
        self._tables = [(name, list(features)) for name, features in tables]
        missing = [name for name, _ in self._tables if name not in bags]
        if missing:
            raise ValueError(f"lookup: no module for table(s) {missing}")
        self._bags = bags

    @property
    def table_names(self) -> list[str]:
        return [name for name, _ in self._tables]

    def __call__(self, features: KeyedJaggedTensor) -> torch.Tensor:
        jagged = features.to_dict()
        pooled = []
        for name, feature_names in self._tables:
            bag = self._bags[name]
            for feature in feature_names:
                jt = jagged[feature]
                values = jt.values()
                offsets = jt.offsets()[:-1].to(values.dtype)
                pooled.append(bag(values, offsets, per_sample_weights=jt.weights_or_none()))
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
_TABLE_OPTIONS = ("format", "max_rank", "shape")


class TTEmbeddingBagCollection(nn.Module):
    def __init__(self, tables: list[EmbeddingBagConfig], *, format: str = "ttm", max_rank=16,
                 min_rows: int = 100_000, table_options: dict[str, dict] | None = None, device=None):
        super().__init__()
        if not tables:
            raise ValueError("tables: expected at least one EmbeddingBagConfig")
        if format not in FORMATS:
            raise ValueError(f"format: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
        table_options = table_options or {}
        names = [t.name for t in tables]
        unknown = set(table_options) - set(names)
        if unknown:
            raise ValueError(f"table_options: unknown table(s) {sorted(unknown)}; tables are {names}")
        self._configs = list(tables)
        self.embedding_bags = nn.ModuleDict()
        for table in tables:
            options = table_options.get(table.name, {})
            bad = set(options) - set(_TABLE_OPTIONS)
            if bad:
                raise ValueError(f"table_options.{table.name}: unknown option(s) {sorted(bad)}; expected {_TABLE_OPTIONS}")
            if table.pooling not in _POOLING:
                raise ValueError(f"tables.{table.name}.pooling: only SUM and MEAN are supported, got {table.pooling}")
            mode = _POOLING[table.pooling]
            if table.num_embeddings >= min_rows or options:
                try:
                    bag = FactorizedEmbeddingBag(
                        table.num_embeddings, table.embedding_dim, format=options.get("format", format),
                        max_rank=options.get("max_rank", max_rank), mode=mode, shape=options.get("shape"),
                    )
                except ValueError as exc:  # name the table: "table_options.t_cat_2.shape[0]: ..."
                    where = f"table_options.{table.name}." if options else f"tables.{table.name}: "
                    raise ValueError(f"{where}{exc}") from None
            else:
                bag = nn.EmbeddingBag(table.num_embeddings, table.embedding_dim, mode=mode)
                bound = table.num_embeddings ** -0.5  # DLRM reference init
                nn.init.uniform_(bag.weight, -bound, bound)
            self.embedding_bags[table.name] = bag.to(device) if device is not None else bag
        self._feature_names = [f for t in tables for f in t.feature_names]
        self._lengths = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._lookup = PooledLookup([(t.name, t.feature_names) for t in tables], self.embedding_bags)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return KeyedTensor(keys=self._feature_names, length_per_key=self._lengths, values=self._lookup(features))
