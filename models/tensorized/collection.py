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

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jagged = features.to_dict()
        pooled = []
        for table in self._configs:
            bag = self.embedding_bags[table.name]
            for feature in table.feature_names:
                values = jagged[feature]
                offsets = values.offsets()[:-1] if values.offsets().numel() else values.offsets()
                pooled.append(bag(values.values(), offsets))
        return KeyedTensor(keys=self._feature_names, length_per_key=self._lengths, values=torch.cat(pooled, dim=1))
