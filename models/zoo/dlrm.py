"""DLRM (TorchRec) whose large embedding tables are tensor trains from construction on.

`build_dlrm` returns a plain `torchrec.models.dlrm.DLRM` (or `DLRM_DCN` with
`arch="dcn"`) whose embedding collection is a `TTEmbeddingBagCollection`:
tables with at least `min_rows` rows (or named in `table_options`) are
`FactorizedEmbeddingBag`s, never materialized, so the Criteo Kaggle
configuration (4.3e9 dense parameters at dim 128) builds and trains on one CPU
machine; the others are plain `nn.EmbeddingBag`s. `format=None` builds every
table plain: the dense baseline.

`forward(dense_features (B, 13) float, sparse_features KeyedJaggedTensor)`
returns logits of shape (B, 1), as TorchRec's DLRM does.

The returned module carries `tensorize_options`: the include patterns that
`models.tensorized.tensorize` (called by `fit` after building) may replace.
The factorized tables are already factorized, so by default nothing else is
(`include=[]`); `tensorize_mlp=True` adds the dense and over arch Linear
layers, so rank methods search the MLPs together with the tables; a
`format=None` build (posthoc's dense phase) also lists the tables of at
least `min_rows` rows, so they are decomposed after dense training.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from ranksearch.models.tensorized import FactorizedLayer, factorized_layers
from ranksearch.models.tensorized.collection import TTEmbeddingBagCollection
from ranksearch.models.tensorized.names import FORMATS

ARCHS = ("dlrm", "dcn")
TABLE_OPTION_KEYS = ("format", "max_rank", "shape")
COLLECTION_PATH = "sparse_arch.embedding_bag_collection"
DEFAULTS = {
    "embedding_dim": 16,
    "format": "ttm",
    "max_rank": 16,
    "min_rows": 10_000,
    "dense_arch": (512, 256, 64),  # DLRM reference for Criteo Kaggle: 13-512-256-64-16
    "over_arch": (512, 256),  # ... and 512-256-1 on top
    "arch": "dlrm",
    "dcn_num_layers": 3,
    "dcn_low_rank_dim": 64,
    "tensorize_mlp": False,
}


def table_name(feature: str) -> str:
    """Table of a sparse feature: `t_<feature>` (as TorchRec's DLRM example names them)."""
    return f"t_{feature}"


def _positive_int(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}: expected a positive integer, got {value!r}")
    return value


def _int_list(field: str, value, *, allow_empty: bool = True) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{field}: expected a list of positive integers, got {value!r}")
    out = [_positive_int(f"{field}[{i}]", v) for i, v in enumerate(value)]
    if not out and not allow_empty:
        raise ValueError(f"{field}: expected at least one layer size, got {value!r}")
    return out


def _max_rank(field: str, value):
    if isinstance(value, (list, tuple)):
        return _int_list(field, value, allow_empty=False)
    return _positive_int(field, value)


def _check_table_options(table_options, names: list[str]) -> dict[str, dict]:
    """Table options keyed by table name; feature names (`cat_3`) are accepted for `t_cat_3`."""
    if table_options is None:
        return {}
    if not isinstance(table_options, dict):
        raise ValueError(f"table_options: expected a mapping table -> options, got {table_options!r}")
    out = {}
    for key, options in table_options.items():
        name = key if key in names else table_name(str(key))
        field = f"table_options.{key}"
        if name not in names:
            raise ValueError(f"{field}: unknown table {key!r}; tables are {names[0]} .. {names[-1]} "
                             f"(or their feature names)")
        if not isinstance(options, dict):
            raise ValueError(f"{field}: expected a mapping of {', '.join(TABLE_OPTION_KEYS)}, got {options!r}")
        unknown = set(options) - set(TABLE_OPTION_KEYS)
        if unknown:
            raise ValueError(f"{field}: unknown option(s) {sorted(unknown)}; expected {', '.join(TABLE_OPTION_KEYS)}")
        if "format" in options and options["format"] not in FORMATS:
            raise ValueError(f"{field}.format: unknown format {options['format']!r}; expected one of {', '.join(FORMATS)}")
        if "max_rank" in options:
            _max_rank(f"{field}.max_rank", options["max_rank"])
        if "shape" in options:
            shape = options["shape"]
            if not isinstance(shape, (list, tuple)) or len(shape) != 2:
                raise ValueError(f"{field}.shape: expected [row_factors, dim_factors], got {shape!r}")
            for i, part in enumerate(shape):
                if part is not None:
                    _int_list(f"{field}.shape[{i}]", part, allow_empty=False)
        out[name] = dict(options)
    return out


def build_dlrm(
    table_sizes: Sequence[int],
    *,
    embedding_dim: int = DEFAULTS["embedding_dim"],
    format: str | None = DEFAULTS["format"],
    max_rank=DEFAULTS["max_rank"],
    min_rows: int = DEFAULTS["min_rows"],
    dense_arch: Sequence[int] = DEFAULTS["dense_arch"],
    over_arch: Sequence[int] = DEFAULTS["over_arch"],
    table_options: dict | None = None,
    arch: str = DEFAULTS["arch"],
    dcn_num_layers: int = DEFAULTS["dcn_num_layers"],
    dcn_low_rank_dim: int = DEFAULTS["dcn_low_rank_dim"],
    tensorize_mlp: bool = DEFAULTS["tensorize_mlp"],
    num_dense: int = 13,
    feature_names: Sequence[str] | None = None,
) -> DLRM:
    """A TorchRec DLRM over `table_sizes` (one table per sparse feature, `t_cat_<i>`).

    - `format`, `max_rank`: the factorized tables' format and max rank (int or per edge);
      `None` format = every table a plain nn.EmbeddingBag (the dense baseline).
    - `min_rows`: tables with at least this many rows are factorized.
    - `table_options`: {table or feature name: {format, max_rank, shape}}; a table named here is
      factorized whatever its size (`shape` = [row_factors, dim_factors], either may be None).
    - `dense_arch`, `over_arch`: hidden layer sizes; the final `embedding_dim` (bottom MLP) and 1
      (top MLP) are appended. `arch="dcn"` uses DLRM_DCN (low-rank cross net interaction).
    - `tensorize_mlp`: let `tensorize` (fit) also factorize the MLP Linear layers.
    """
    if isinstance(table_sizes, (str, bytes)) or not isinstance(table_sizes, Sequence) or not table_sizes:
        raise ValueError(f"table_sizes: expected a non-empty list of positive integers, got {table_sizes!r}")
    sizes = [_positive_int(f"table_sizes[{i}]", int(s) if isinstance(s, numbers.Integral) and not isinstance(s, bool) else s)
             for i, s in enumerate(table_sizes)]
    embedding_dim = _positive_int("embedding_dim", embedding_dim)
    num_dense = _positive_int("num_dense", num_dense)
    min_rows = _positive_int("min_rows", min_rows)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: unknown format {format!r}; expected one of {', '.join(FORMATS)} (or None: dense)")
    max_rank = _max_rank("max_rank", max_rank)
    dense_hidden = _int_list("dense_arch", dense_arch)
    over_hidden = _int_list("over_arch", over_arch, allow_empty=False)
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    if not isinstance(tensorize_mlp, bool):
        raise ValueError(f"tensorize_mlp: expected true or false, got {tensorize_mlp!r}")
    if feature_names is None:
        feature_names = [f"cat_{i}" for i in range(len(sizes))]
    feature_names = list(feature_names)
    if len(feature_names) != len(sizes) or len(set(feature_names)) != len(sizes):
        raise ValueError(f"feature_names: expected {len(sizes)} distinct names (one per table), got {feature_names!r}")

    tables = [
        EmbeddingBagConfig(name=table_name(f), embedding_dim=embedding_dim, num_embeddings=n, feature_names=[f],
                           pooling=PoolingType.SUM)
        for f, n in zip(feature_names, sizes)
    ]
    names = [t.name for t in tables]
    options = _check_table_options(table_options, names)
    if format is None:  # dense baseline: every table plain, whatever its size or options
        collection = TTEmbeddingBagCollection(tables, format="ttm", max_rank=1, min_rows=max(sizes) + 1)
    else:
        collection = TTEmbeddingBagCollection(tables, format=format, max_rank=max_rank, min_rows=min_rows,
                                              table_options=options)
    common = dict(
        embedding_bag_collection=collection, dense_in_features=num_dense,
        dense_arch_layer_sizes=dense_hidden + [embedding_dim], over_arch_layer_sizes=over_hidden + [1],
    )
    if arch == "dcn":
        net = DLRM_DCN(**common, dcn_num_layers=_positive_int("dcn_num_layers", dcn_num_layers),
                       dcn_low_rank_dim=_positive_int("dcn_low_rank_dim", dcn_low_rank_dim))
    else:
        net = DLRM(**common)

    include = ["dense_arch.*", "over_arch.*"] if tensorize_mlp else []
    if format is None:
        include += [f"{COLLECTION_PATH}.embedding_bags.{t.name}" for t in tables
                    if t.num_embeddings >= min_rows or t.name in options]
    net.tensorize_options = {"include": include}
    net.default_table_optimizer = "rowwise_adagrad"  # train.table_optimizer: auto, as TorchRec trains DLRMs
    return net


# ---- parameter accounting ---------------------------------------------------------------------


def embedding_collections(model: nn.Module) -> dict[str, nn.Module]:
    """Every embedding bag collection in `model` (TT or TorchRec), by module name."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "embedding_bag_configs") and hasattr(m, "embedding_bags")}


def embedding_tables(model: nn.Module) -> dict[str, nn.Module]:
    """Every table of every collection, by module name (`...embedding_bags.t_cat_3`)."""
    out = {}
    for prefix, collection in embedding_collections(model).items():
        for name, bag in collection.embedding_bags.items():
            out[f"{prefix}.embedding_bags.{name}" if prefix else f"embedding_bags.{name}"] = bag
    return out


def _table_params(bag: nn.Module) -> tuple[int, int]:
    """(parameters, dense parameters) of one table; factorized tables count kept rank slices."""
    if isinstance(bag, FactorizedLayer):
        return bag.num_parameters(), bag.dense_parameters()
    n = sum(p.numel() for p in bag.parameters())
    return n, n


def embedding_summary(model: nn.Module) -> dict:
    """Embedding parameters (kept), their dense count, and one row per table — for the run record."""
    tables = []
    for name, bag in embedding_tables(model).items():
        params, dense = _table_params(bag)
        row = {"table": name.rsplit(".", 1)[-1], "layer": name, "params": params, "dense_params": dense,
               "factorized": isinstance(bag, FactorizedLayer)}
        if isinstance(bag, FactorizedLayer):
            row.update(format=bag.format, ranks=bag.ranks, rows=bag.num_embeddings, dim=bag.embedding_dim)
        else:
            row.update(rows=bag.weight.shape[0], dim=bag.weight.shape[1])
        tables.append(row)
    params = sum(t["params"] for t in tables)
    dense = sum(t["dense_params"] for t in tables)
    return {
        "embedding_params": params,
        "embedding_dense_params": dense,
        "embedding_compression": dense / params if params else math.nan,
        "tables": tables,
    }


def mlp_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Factorized layers outside the embedding collections (the MLPs, when tensorize_mlp)."""
    tables = set(embedding_tables(model))
    return {n: m for n, m in factorized_layers(model).items() if n not in tables}
