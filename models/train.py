"""`fit`: one training run of any method, ending at or under the budget, returning the
result record every report and the CLI use (fields in DESIGN.md §2).

Every compressed method trains for `epochs + finetune_epochs` epochs in total, so
methods are compared at equal training cost:
- dense: the uncompressed baseline.
- fixed: the same rank on every edge, the largest that fits the budget, from the start.
- posthoc: train dense for `epochs`, decompose at the fixed rank that fits, fine-tune.
- bayesian, l0, lwiq: tensorize at max_rank, search ranks with the method for
  `method.search_epochs(epochs)` epochs, select to the budget, prune, train the rest.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from ranksearch.models.rank_selection import make_method
from ranksearch.models.rank_selection.budget import (
    resolve_budget, tensorized_dense_params, tensorized_params, uniform_rank_for_budget,
)
from ranksearch.models.rank_selection.hyperparams import METHODS, TRAIN_DEFAULTS
from ranksearch.models.tensorized import FORMATS, dense_model_params, factorized_layers, model_params, tensorize
from ranksearch.models.tensorized.table_optim import TABLE_OPTIMIZERS
from ranksearch.models.zoo import build_model

from .trainer import Trainer


def _check_train_config(train: dict | None) -> dict:
    cfg = {**TRAIN_DEFAULTS, **(train or {})}
    unknown = set(cfg) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"train: unknown setting(s) {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    for key in ("epochs", "batch_size", "max_rank"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < (0 if key == "epochs" else 1):
            raise ValueError(f"train.{key}: expected a positive integer, got {cfg[key]!r}")
    if cfg["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"train.optimizer: expected 'adam' or 'sgd', got {cfg['optimizer']!r}")
    table_choices = ("auto", "none", *TABLE_OPTIMIZERS)
    if cfg["table_optimizer"] not in table_choices:
        raise ValueError(f"train.table_optimizer: expected one of {', '.join(table_choices)}, got {cfg['table_optimizer']!r}")
    if cfg["schedule"] not in ("cosine", "none"):
        raise ValueError(f"train.schedule: expected 'cosine' or 'none', got {cfg['schedule']!r}")
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def make_task(model_name: str, data, cfg: dict, device: torch.device):
    if model_name == "dlrm":
        from ranksearch.models.rec_task import RecTask

        return RecTask(data, batch_size=cfg["batch_size"], seed=cfg["seed"], device=device)
    from ranksearch.models.tasks import ClassificationTask

    return ClassificationTask(data, batch_size=cfg["batch_size"], seed=cfg["seed"], device=device)


def _tensorize(net, fmt, max_rank, init="random") -> dict:
    # a model may restrict which of its layers tensorize may replace (DLRM: its tables are factorized
    # at construction; only the MLPs, if asked, or after a dense build the large tables)
    tensorize(net, format=fmt, max_rank=max_rank, init=init, **getattr(net, "tensorize_options", {}))
    layers = factorized_layers(net)
    if not layers:
        raise ValueError("model: no layer is large enough to tensorize (tensorize's min_params)")
    return layers


def fit(*, model: str = "mlp", dataset: str = "digits", method: str = "fixed", format: str | None = "tt",
        budget=0.1, train: dict | None = None, method_params: dict | None = None, data=None,
        dataset_options: dict | None = None, model_options: dict | None = None, device: str = "auto",
        on_epoch=None, progress: bool = False, save: str | None = None, trainer_cls=Trainer) -> dict:
    """Train one model with one method at one budget; returns the run record.

    `model_options` go to the model's builder (e.g. dlrm: embedding_dim, min_rows, dense_arch, ...).
    `trainer_cls` runs the epochs (models.distributed swaps in a sharded trainer).
    """
    wall_start = time.perf_counter()
    cfg = _check_train_config(train)
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method != "dense" and format not in FORMATS:
        raise ValueError(f"format: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    seed_everything(cfg["seed"])
    dev = resolve_device(device)
    if data is None:
        from ranksearch.models.data import load_dataset

        data = load_dataset(dataset, seed=cfg["seed"], **(dataset_options or {}))
    task = make_task(model, data, cfg, dev)
    model_options = dict(model_options or {})
    if getattr(task, "factorized_build", False) and {"format", "max_rank"} & set(model_options):
        raise ValueError("model_options: format and max_rank are set by fit's format and train.max_rank")

    def model_kwargs(fmt) -> dict:
        """A task with `factorized_build` (DLRM) has its large tables factorized at construction in
        `fmt` at train.max_rank (None: all dense), so they are never allocated dense."""
        kwargs = {**task.model_kwargs(), **model_options}
        if getattr(task, "factorized_build", False):
            kwargs.update(format=fmt, max_rank=cfg["max_rank"])
        return kwargs

    net = build_model(model, **model_kwargs(None if method in ("dense", "posthoc") else format)).to(dev)
    trainer = trainer_cls(net, task, cfg, on_epoch, progress)
    search_time, method_state, budget_params = 0.0, {}, None
    total = cfg["epochs"] + cfg["finetune_epochs"]

    if method == "dense":
        trainer.run(total, "train")
    elif method == "posthoc":
        trainer.restart_schedule(cfg["epochs"])
        trainer.run(cfg["epochs"], "dense")
        search_start = time.perf_counter()
        probe = build_model(model, **model_kwargs(format))
        layers = _tensorize(probe, format, cfg["max_rank"])
        budget_params = resolve_budget(budget, layers)
        rank = uniform_rank_for_budget(layers, budget_params)
        _tensorize(net, format, rank, init="decompose")
        search_time = time.perf_counter() - search_start
        trainer.restart_schedule(cfg["finetune_epochs"])
        trainer.run(cfg["finetune_epochs"], "finetune")
    else:
        layers = _tensorize(net, format, cfg["max_rank"])
        budget_params = resolve_budget(budget, layers)
        if method == "fixed":
            rank = uniform_rank_for_budget(layers, budget_params)
            for layer in layers.values():
                for edge, m in enumerate(layer.rank_masks):
                    layer.weight.set_mask(edge, torch.arange(m.numel()) < rank)
                layer.prune()
            trainer.run(total, "train")
        else:
            rank_method = make_method(method, **(method_params or {})).to(dev)
            rank_method.attach(net, budget_params)
            search_start = time.perf_counter()
            search_epochs = min(rank_method.search_epochs(cfg["epochs"]), cfg["epochs"])
            trainer.restart_schedule(search_epochs)
            trainer.run(search_epochs, "search", rank_method)
            net.eval()
            rank_method.measure(net, task.heldout_batches())
            rank_method.select()
            rank_method.detach()
            method_state = rank_method.state()
            for layer in layers.values():
                layer.prune()
            search_time = time.perf_counter() - search_start
            trainer.restart_schedule(total - search_epochs)
            trainer.run(cfg["epochs"] - search_epochs, "train")
            trainer.run(cfg["finetune_epochs"], "finetune")

    metrics = task.evaluate(net)
    layers = factorized_layers(net)
    record = {
        "model": model, "dataset": dataset if isinstance(dataset, str) else getattr(data, "name", "custom"),
        "format": None if method == "dense" else format, "method": method,
        "budget": None if method == "dense" else budget, "seed": cfg["seed"], "config": {**cfg, **(method_params or {})},
        "model_options": model_options,
        **metrics,
        "params": model_params(net), "dense_params": dense_model_params(net),
        "tensorized_params": tensorized_params(layers), "tensorized_dense_params": tensorized_dense_params(layers),
        "budget_params": budget_params,
        "budget_met": None if budget_params is None else tensorized_params(layers) <= budget_params,
        "ranks": {name: layer.ranks for name, layer in layers.items()},
        "layers": [{"layer": name, **layer.describe()} for name, layer in layers.items()],
        "method_state": method_state, "epochs_done": trainer.epoch,
        "rank_search_time_s": search_time, "wall_time_s": time.perf_counter() - wall_start,
    }
    record["compression"] = record["dense_params"] / record["params"]
    if save:
        from ranksearch.models.checkpoint import save_compressed

        save_compressed(save, net, record, model_kwargs(None if method == "dense" else format))
    return record
