"""`fit`: one training run of any method, ending at or under the budget, returning the
result record every report and the CLI use (its fields: README, "One training run").

`fit` builds a zoo model, its data and task; what each method does with them is its strategy
(models/strategies.py: one registry, the baselines included), the same path `compress` takes
for a user's own network.
"""

from __future__ import annotations

import copy
import random
import time

import numpy as np
import torch

from ranksearch.models.rank_selection.budget import tensorized_dense_params, tensorized_params
from ranksearch.models.rank_selection.hyperparams import METHODS, TRAIN_DEFAULTS
from ranksearch.models.strategies import INITS, Run, get_strategy
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


def _tensorize(net, fmt, max_rank, init="random", shapes=None) -> dict:
    # a model may restrict which of its layers tensorize may replace (DLRM: its tables are factorized
    # at construction; only the MLPs, if asked, or after a dense build the large tables)
    tensorize(net, format=fmt, max_rank=max_rank, init=init, shapes=shapes, **getattr(net, "tensorize_options", {}))
    layers = factorized_layers(net)
    if not layers:
        raise ValueError("model: no layer is large enough to tensorize (tensorize's min_params)")
    return layers


def fit(*, model: str = "mlp", dataset: str = "digits", method: str = "fixed", format: str | None = "tt",
        budget=0.1, train: dict | None = None, method_params: dict | None = None, data=None,
        dataset_options: dict | None = None, model_options: dict | None = None, device: str = "auto",
        on_epoch=None, progress: bool = False, save: str | None = None, trainer_cls=Trainer,
        init: str = "random", checkpoint: str | None = None, shapes: dict | None = None) -> dict:
    """Train one model with one method at one budget; returns the run record.

    `init="pretrained"` starts from `checkpoint` (a state_dict of the dense model, read with
    weights_only=True): the strategies then decompose the trained layers (models/strategies.py).
    `model_options` go to the model's builder (e.g. dlrm: embedding_dim, min_rows, dense_arch, ...).
    `shapes` sets layers' mode shapes by name ({"1": {"in_shape": [4, 7, 4, 7], "out_shape": [4, 4, 8, 4]}}).
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

    strategy = get_strategy(method)
    if init not in INITS:
        raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")
    pretrained = init == "pretrained"
    net = build_model(model, **model_kwargs(None if strategy.builds_dense or pretrained else format))
    dense_reference, dense_metric = None, None
    if pretrained:
        if not checkpoint:
            raise ValueError("checkpoint: init='pretrained' needs the trained model's state_dict (checkpoint=PATH)")
        _load_state(net, checkpoint)
        net.to(dev)
        dense_reference = copy.deepcopy(net).eval()
        dense_metric = task.evaluate(dense_reference)
    net = net.to(dev)
    trainer = trainer_cls(net, task, cfg, on_epoch, progress)
    run = Run(net=net, task=task, trainer=trainer, cfg=cfg, format=format, budget=budget, init=init,
              dense_reference=dense_reference, method_params=dict(method_params or {}),
              tensorize=lambda net, fmt, rank, start="random": _tensorize(net, fmt, rank, start, shapes),
              probe=lambda: _tensorize(build_model(model, **model_kwargs(format)), format, cfg["max_rank"], shapes=shapes))
    if shapes is not None and strategy.compresses:
        run.probe()  # a bad layer name or shape fails here, not after a dense phase (posthoc, lwiq start: dense)
    strategy.run(run)
    record = run_record(run, strategy, task.evaluate(net), wall_start)
    record = {"model": model, "dataset": dataset if isinstance(dataset, str) else getattr(data, "name", "custom"),
              "model_options": model_options, "init": init, **record,
              "dense_metric": None if dense_metric is None else dense_metric[getattr(task, "primary_metric", next(iter(dense_metric)))]}
    if save:
        from ranksearch.models.checkpoint import save_compressed

        save_compressed(save, net, record, model_kwargs(None if method == "dense" else format))
    return record


def _load_state(net, checkpoint: str) -> None:
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint: {checkpoint} does not exist") from None
    except Exception as exc:
        raise ValueError(f"checkpoint: {checkpoint} is not a state_dict ({type(exc).__name__}: {exc})") from None
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"checkpoint: {checkpoint} does not fit the model ({str(exc).splitlines()[0]})") from None


def run_record(run: Run, strategy, metrics: dict, wall_start: float) -> dict:
    """The run-record fields every caller shares (README, "One training run"), from a finished run."""
    net, cfg = run.net, run.cfg
    layers = factorized_layers(net)
    record = {
        "format": run.format if strategy.compresses else None, "method": strategy.name,
        "budget": run.budget if strategy.compresses else None, "seed": cfg["seed"],
        "config": {**cfg, **run.method_params}, **metrics,
        "params": model_params(net), "dense_params": dense_model_params(net),
        "tensorized_params": tensorized_params(layers), "tensorized_dense_params": tensorized_dense_params(layers),
        "budget_params": run.budget_params,
        "budget_met": None if run.budget_params is None else tensorized_params(layers) <= run.budget_params,
        "ranks": {name: layer.ranks for name, layer in layers.items()},
        "layers": [{"layer": name, **layer.describe()} for name, layer in layers.items()],
        "start_metrics": run.start_metrics, "method_state": run.method_state, "epochs_done": run.trainer.epoch,
        "rank_search_time_s": run.search_time, "wall_time_s": time.perf_counter() - wall_start,
    }
    record["compression"] = record["dense_params"] / record["params"]
    return record
