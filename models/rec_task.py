"""RecTask: what `fit` trains a DLRM on — click-through batches, BCE loss, AUC / log loss / accuracy.

Batches are `((dense, sparse), labels)`: `dense` (B, 13) float, `sparse` a KeyedJaggedTensor
(`cat_0` .. `cat_25`), `labels` (B,) float 0/1 — the same (x, y) shape as the image task, so
the trainer and LWIQ's measurement (which calls `model(*x)`) work unchanged. A seeded
`val_fraction` of the training split is held out for per-epoch validation and for LWIQ;
`evaluate` uses the data's test split (Criteo: the last rows, time order).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ranksearch.models.data.criteo import make_batch


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """auc (ROC, NaN when only one class is present), logloss (mean BCE), accuracy (p > 0.5)."""
    logits, labels = logits.detach().double().cpu().reshape(-1), labels.detach().double().cpu().reshape(-1)
    if labels.numel() == 0:
        return {"auc": math.nan, "logloss": math.nan, "accuracy": math.nan}
    logloss = float(F.binary_cross_entropy_with_logits(logits, labels))
    accuracy = float(((logits > 0).double() == labels).double().mean())
    if labels.min() == labels.max():  # one class only: AUC undefined
        auc = math.nan
    else:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(labels.numpy(), logits.numpy()))
    return {"auc": auc, "logloss": logloss, "accuracy": accuracy}


class RecTask:
    """Click-through prediction on RecData (`models.data`): `model(dense, sparse)` gives (B, 1) logits."""

    primary_metric = "auc"
    factorized_build = True  # fit passes format / max_rank to build_dlrm: large tables are never dense

    def __init__(self, data, *, batch_size: int, seed: int, device: torch.device, val_fraction: float = 0.1,
                 eval_batch_size: int = 4096):
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction!r}")
        self.data, self.batch_size, self.device, self.seed = data, batch_size, device, seed
        self.eval_batch_size = max(batch_size, eval_batch_size)
        train = data.split_range("train")
        if len(train) < 2:
            raise ValueError(f"dataset: {len(train)} training rows; need at least 2 (one to hold out)")
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(train))) + train.start
        n_val = max(1, int(len(order) * val_fraction))
        self.val_idx, self.train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        test = data.split_range("test")
        self.test_idx = torch.arange(test.start, test.stop)

    def model_kwargs(self) -> dict:
        """What `build_dlrm` needs from the data; model options (embedding_dim, format, ...) come from fit."""
        return {"table_sizes": [int(s) for s in self.data.table_sizes], "num_dense": int(self.data.dense.shape[1])}

    # ---- batches ------------------------------------------------------------------------------
    def _batches(self, idx: torch.Tensor, batch_size: int, shuffle_seed: int | None = None):
        if shuffle_seed is not None:
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(shuffle_seed))]
        d = self.data
        for start in range(0, len(idx), batch_size):
            b = idx[start : start + batch_size]
            batch = make_batch(d.dense[b], d.sparse[b], d.labels[b]).to(self.device)
            yield (batch.dense, batch.sparse), batch.labels

    def train_batches(self, epoch: int):
        return self._batches(self.train_idx, self.batch_size, shuffle_seed=self.seed * 1000 + epoch)

    def heldout_batches(self):
        """Held-out (x, y) batches at least `eval_batch_size` large, so LWIQ's few batches are
        thousands of samples (binary labels need that many for a stable proxy accuracy)."""
        return self._batches(self.val_idx, self.eval_batch_size)

    # ---- loss and metrics ---------------------------------------------------------------------
    @staticmethod
    def logits(model: nn.Module, x) -> torch.Tensor:
        dense, sparse = x
        return model(dense, sparse).reshape(-1)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.logits(model, x), y)

    @torch.no_grad()
    def _metrics(self, model: nn.Module, batches) -> dict:
        was_training = model.training
        model.eval()
        try:
            logits, labels = [], []
            for x, y in batches:
                logits.append(self.logits(model, x))
                labels.append(y)
        finally:
            model.train(was_training)
        if not logits:
            return binary_metrics(torch.zeros(0), torch.zeros(0))
        return binary_metrics(torch.cat(logits), torch.cat(labels))

    def validate(self, model: nn.Module) -> dict:
        return self._metrics(model, self.heldout_batches())

    def evaluate(self, model: nn.Module) -> dict:
        """Test-split metrics, plus the embedding parameter counts the record reports."""
        metrics = self._metrics(model, self._batches(self.test_idx, self.eval_batch_size))
        return {**metrics, **self.model_record(model)}

    def model_record(self, model: nn.Module) -> dict:
        """Embedding parameters (kept and dense) and per-table sizes: budgets count embeddings separately."""
        from ranksearch.models.zoo.dlrm import embedding_summary

        summary = embedding_summary(model)
        summary["tables"] = [{k: v for k, v in t.items() if k != "layer"} for t in summary["tables"]]
        return summary
