"""One `fit` on k workers: Ray Train's `TorchTrainer`, TorchRec's DistributedModelParallel inside.

    record = fit_distributed(num_workers=2, use_gpu=False, cpus_per_worker=1,
                             model="dlrm", dataset="synthetic-criteo", method="fixed", format="ttm", ...)

returns the same record as `models.train.fit(**fit_kwargs)` (from rank 0), plus a `distributed`
entry (world size, backend, the table placement of the last sharded phase).

How. Each worker runs `models.train.fit` itself, unchanged, with its `Trainer` replaced by
`DistributedTrainer` for the duration of the call. Everything `fit` does between training phases
(tensorize, budgets, rank selection, pruning, post-hoc decomposition, evaluation, the record) runs
on the full unsharded model, identically on every rank (same seed, same data, same code). Each
training phase (`Trainer.run`) instead:

1. wraps the model in `DistributedModelParallel` with `TTEmbeddingBagCollectionSharder` (and
   TorchRec's EBC sharder): phases without a rank-selection method (dense, train, finetune) place
   the tables TABLE-WISE (TorchRec's `EmbeddingShardingPlanner` with the TT-aware estimators of
   `planning.py`, or `balanced_table_wise_plan`); the rank-search phase (a method attached)
   replicates them DATA-PARALLEL instead, because every method's state (priors, gates, measured
   significance) and its selection are global over all tables, exactly as in one process; TT tables
   are small, so replicating them is cheap. Everything else is DDP (DMP's default wrapper);
2. trains the rank's part of every global batch (each batch split in `world` contiguous slices);
   gradients match one process on the whole batch: DDP averages dense gradients, TorchRec's pooled
   all-to-all divides the table gradients by the world size; the method's own parameters (gates,
   posterior scales) are all-reduced before each optimizer step;
3. validates through the sharded model each epoch (every rank the same held-out batches) and
   reports the epoch row with `ray.train.report` from every rank (rank 0's row is kept);
4. unwraps: puts the unsharded collections back and broadcasts every table-wise table from its
   owner, so all ranks hold the whole trained model again.

Rank 0's `fit` returns the record; Ray Train hands it to the driver (`Result.return_value`).

Where the per-epoch rows go is the caller's choice, not this module's: `callbacks` are Ray Train
run callbacks — the orchestrator's Tune trainable passes Ray's `TuneReportCallback`, which forwards
each row to the trial as an intermediate result (`ray.train.report` is the right call in the
TorchTrainer workers; it raises in Tune's function trainable itself), so nothing here imports Ray
Tune. The trial should reserve ~no resources of its own (Ray Train's controller takes 0 CPU; the
workers ask for `cpus_per_worker` / 1 GPU each): e.g. `tune.with_resources(trainable, {"cpu": 0})`.
`on_epoch`, if given, is called with the rows after training ends.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ranksearch.models.train import fit
from ranksearch.models.trainer import Trainer

__all__ = ["DistributedTrainer", "ShardedTask", "fit_distributed", "slice_batch", "slice_kjt", "train_worker"]

PLANNERS = ("torchrec", "balanced")


# ---- batches: the rank's slice of every global batch --------------------------------------------


def slice_kjt(kjt, start: int, stop: int):
    """Rows [start, stop) of every key of a KeyedJaggedTensor (same keys, stride stop - start)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = kjt.keys()
    stride = kjt.stride()
    lengths = kjt.lengths().view(len(keys), stride)
    values, weights = kjt.values(), kjt.weights_or_none()
    key_starts = kjt.offset_per_key()
    before = lengths[:, :start].sum(1).tolist()
    inside = lengths[:, start:stop].sum(1).tolist()
    parts = [slice(key_starts[k] + before[k], key_starts[k] + before[k] + inside[k]) for k in range(len(keys))]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([values[p] for p in parts]) if parts else values[:0],
        lengths=lengths[:, start:stop].reshape(-1),
        weights=None if weights is None else torch.cat([weights[p] for p in parts]),
    )


def _batch_len(batch) -> int:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, KeyedJaggedTensor):
        return batch.stride()
    if isinstance(batch, (tuple, list)):
        return _batch_len(batch[0])
    if hasattr(batch, "labels"):
        return batch.labels.shape[0]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


def slice_batch(batch, rank: int, world: int):
    """The rank's contiguous slice of a batch: tensors, KeyedJaggedTensors, RecBatch-like objects
    and (nested) tuples of them; slices differ in size by at most one sample."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    n = _batch_len(batch)
    start = rank * n // world
    stop = (rank + 1) * n // world

    def cut(x):
        if isinstance(x, torch.Tensor):
            return x[start:stop]
        if isinstance(x, KeyedJaggedTensor):
            return slice_kjt(x, start, stop)
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v) for v in x)
        if hasattr(x, "dense") and hasattr(x, "sparse") and hasattr(x, "labels"):
            return type(x)(cut(x.dense), cut(x.sparse), cut(x.labels))
        raise TypeError(f"cannot split a batch part of type {type(x).__name__}")

    return cut(batch)


class ShardedTask:
    """A task whose training batches are this rank's slice of each global batch; everything else
    (held-out batches, metrics, evaluation) is the wrapped task's, the same on every rank."""

    def __init__(self, task, rank: int, world: int):
        self.task, self.rank, self.world = task, rank, world

    def __getattr__(self, name):
        return getattr(self.task, name)

    def train_batches(self, epoch: int):
        for batch in self.task.train_batches(epoch):
            if _batch_len(batch) < self.world:  # a last batch too small to give every rank a sample
                continue
            yield slice_batch(batch, self.rank, self.world)


# ---- the trainer that shards each phase -----------------------------------------------------------


def _tt_collections(net: nn.Module) -> Dict[str, nn.Module]:
    from ranksearch.models.tensorized.collection import TTEmbeddingBagCollection

    return {path: m for path, m in net.named_modules() if isinstance(m, TTEmbeddingBagCollection)}


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class DistributedTrainer(Trainer):
    """`models.train.Trainer` with each `run` (phase) on a DistributedModelParallel model.

    Built by `fit` in place of `Trainer` (see `train_worker`); `self.net` is the DMP during a
    phase and the full unsharded model between phases. Requires an initialized process group.
    """

    def __init__(self, net: nn.Module, task, cfg: dict, on_epoch, progress: bool, *, options: Dict[str, Any]):
        self.options = options  # device, planner; receives the placements of each phase
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        super().__init__(net, ShardedTask(task, self.rank, self.world), cfg, on_epoch, progress and self.rank == 0)
        self.full_net = net
        self.device = self.options.get("device") or next(net.parameters()).device
        self.planner = self.options.get("planner", "torchrec")
        # mode and table placement of every sharded phase, shared with run_fit_on_rank
        self.placements: List[dict] = self.options.setdefault("placements", [])
        self._phase_params = 0

    # -- sharding ----------------------------------------------------------------------------

    def _plan(self, mode: str):
        from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel
        from torchrec.distributed.types import ShardingPlan

        from .planning import balanced_table_wise_plan, plan_sharding
        from .sharder import TTEmbeddingBagCollectionSharder

        collections = _tt_collections(self.full_net)
        if not collections:
            return ShardingPlan({})
        device_type = self.device.type
        if mode == "data_parallel":
            sharder = TTEmbeddingBagCollectionSharder()
            return ShardingPlan({
                path: construct_module_sharding_plan(
                    coll, {c.name: data_parallel() for c in coll.embedding_bag_configs()}, sharder=sharder,
                    local_size=self.world, world_size=self.world, device_type=device_type,
                )
                for path, coll in collections.items()
            })
        batch_size = max(1, self.cfg["batch_size"] // self.world)
        if self.planner == "balanced":
            return balanced_table_wise_plan(self.full_net, world_size=self.world, compute_device=device_type,
                                            batch_size=batch_size)
        return plan_sharding(self.full_net, world_size=self.world, compute_device=device_type,
                             batch_size=batch_size, pg=dist.group.WORLD)

    def _shard(self, mode: str):
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.types import ShardingEnv

        from ranksearch.models.tensorized import model_params

        from .planning import default_sharders, table_placement

        self._phase_params = model_params(self.full_net)
        collections = _tt_collections(self.full_net)
        plan = self._plan(mode)
        dmp = DistributedModelParallel(
            self.full_net, env=ShardingEnv.from_process_group(dist.group.WORLD), device=self.device, plan=plan,
            sharders=default_sharders(),
        )
        self.placements.append({"phase_epoch": self.epoch, "mode": mode, "tables": table_placement(plan)})
        return dmp, collections, plan

    @torch.no_grad()
    def _unshard(self, dmp, collections: Dict[str, nn.Module], plan) -> None:
        from torchrec.distributed.types import ShardingType

        for path, coll in collections.items():
            _set_submodule(self.full_net, path, coll)
        # drop the DMP (and its DDP reducer, whose destructor removes its gradient hooks)
        dmp._dmp_wrapped_module = None
        del dmp
        gc.collect()
        for path, coll in collections.items():
            module_plan = plan.plan.get(path, {})
            for name, ps in module_plan.items():
                if ps.sharding_type != ShardingType.TABLE_WISE.value:
                    continue  # data-parallel tables are equal on every rank already (DDP)
                for tensor in coll.embedding_bags[name].state_dict(keep_vars=True).values():
                    dist.broadcast(tensor.data, src=ps.ranks[0])

    # -- training ------------------------------------------------------------------------------

    def run(self, epochs: int, phase: str, method=None) -> None:
        if epochs <= 0:
            return
        mode = "data_parallel" if method is not None else "table_wise"
        dmp, collections, plan = self._shard(mode)
        self.net = dmp
        try:
            super().run(epochs, phase, method)
        except BaseException:
            # no collectives here: the other ranks may be elsewhere; Ray Train (or the caller)
            # stops the whole group when one worker fails
            self.net = self.full_net
            raise
        self.net = self.full_net
        self._unshard(dmp, collections, plan)

    def _table_optimizer(self):
        """None: under DMP a table is data-parallel (DDP all-reduces its gradients) or owned by one
        rank; an update inside backward would bypass the all-reduce, so sharded runs keep the
        dense optimizer for tables."""
        return None

    def _optimizer(self, method, lr: float):
        optimizer = super()._optimizer(method, lr)
        if method is not None:
            own = [p for p in method.parameters()]
            if own:
                world = self.world

                def average_method_grads(_optimizer, _args, _kwargs):
                    for p in own:
                        grad = p.grad if p.grad is not None else torch.zeros_like(p)
                        dist.all_reduce(grad)
                        if p.requires_grad:
                            p.grad = grad / world

                optimizer.register_step_pre_hook(average_method_grads)
        return optimizer

    def _report(self, phase: str, loss: float, seconds: float) -> None:
        mean = torch.tensor([0.0 if math.isnan(loss) else loss, 0.0 if math.isnan(loss) else 1.0],
                            dtype=torch.float64, device=self.device)
        dist.all_reduce(mean)
        super()._report(phase, float(mean[0] / mean[1]) if mean[1] > 0 else float("nan"), seconds)

    def _params(self) -> int:
        return self._phase_params  # counted on the unsharded model: the DMP holds only this rank's tables


def train_worker(config: dict) -> Optional[dict]:
    """Ray Train's `train_loop_per_worker`: `fit` on this rank, each epoch row reported with
    `ray.train.report` (on every rank: it is a barrier; rank 0's row is kept). Rank 0 returns the
    record (Ray Train v2 hands rank 0's return value to the driver as `Result.return_value`)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    record = run_fit_on_rank(config, report=lambda row: ray.train.report(row))
    return record if rank == 0 else None


def run_fit_on_rank(config: dict, report: Optional[Callable[[dict], None]] = None) -> dict:
    """`fit(**config["fit_kwargs"])` on this rank of an initialized process group (Ray Train's, or
    any other: tests use torch.multiprocessing). Returns the record (the same on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = dict(config["fit_kwargs"])
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    use_gpu = config.get("use_gpu", False)
    if use_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        try:
            import ray.train.torch as ray_torch

            device = ray_torch.get_device()
        except Exception:  # noqa: BLE001 - outside Ray Train
            device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    kwargs["device"] = str(device)
    if rank != 0:
        kwargs["save"] = None
        kwargs["progress"] = False
    rows: List[dict] = []

    def on_epoch(row: dict) -> None:
        rows.append(row)
        if report is not None:
            report(row)

    kwargs["on_epoch"] = on_epoch
    options = {"device": device, "planner": config.get("planner", "torchrec")}
    start = time.perf_counter()
    record = fit(**kwargs, trainer_cls=functools.partial(DistributedTrainer, options=options))
    record["history"] = rows
    record["distributed"] = {
        "world_size": world, "backend": dist.get_backend(), "planner": options["planner"],
        "placements": options.get("placements", []), "fit_wall_time_s": time.perf_counter() - start,
    }
    return record


# ---- the driver ------------------------------------------------------------------------------


def _absolute_dataset(dataset):
    """Paths in `kind:PATH` dataset specs made absolute: Ray Train may run workers elsewhere."""
    if isinstance(dataset, str) and ":" in dataset:
        kind, _, path = dataset.partition(":")
        if path and not path.startswith(("/", "~")) and os.path.exists(path):
            return f"{kind}:{os.path.abspath(path)}"
    return dataset


def fit_distributed(
    *,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    planner: str = "torchrec",
    storage_path: str | None = None,
    name: str | None = None,
    callbacks: Optional[list] = None,
    on_epoch: Optional[Callable[[dict], None]] = None,
    max_failures: int = 0,
    **fit_kwargs,
) -> dict:
    """Run `models.train.fit(**fit_kwargs)` on `num_workers` Ray Train workers (TorchTrainer;
    gloo on CPU, nccl on GPU), with the model's TT embedding collections sharded table-wise by
    DistributedModelParallel; returns rank 0's record (see the module docstring).

    - `planner`: "torchrec" (EmbeddingShardingPlanner with TT-aware estimators) or "balanced".
    - `callbacks`: Ray Train run callbacks that receive each epoch row as it is reported (e.g.
      `ray.tune.integration.ray_train.TuneReportCallback()` inside a Tune trial).
    - `on_epoch`: called here with each epoch row once training has finished.
    - `storage_path` / `name`: where Ray Train keeps the run (default ~/ray_results).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers: expected a positive integer, got {num_workers!r}")
    if planner not in PLANNERS:
        raise ValueError(f"planner: expected one of {', '.join(PLANNERS)}, got {planner!r}")
    if not cpus_per_worker >= 0:
        raise ValueError(f"cpus_per_worker: expected a non-negative number, got {cpus_per_worker!r}")
    if fit_kwargs.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise ValueError("device: fit_distributed places workers itself (use_gpu); leave device unset")
    fit_kwargs.pop("device", None)
    if fit_kwargs.pop("on_epoch", None) is not None:
        raise ValueError("on_epoch: pass it to fit_distributed itself")
    if "dataset" in fit_kwargs:
        fit_kwargs["dataset"] = _absolute_dataset(fit_kwargs["dataset"])
    if not ray.is_initialized():
        raise RuntimeError("fit_distributed: Ray is not initialized (ray.init(...) or run inside a Ray job)")

    resources = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(gpus_per_worker if gpus_per_worker is not None else 1.0)
    config = {
        "fit_kwargs": fit_kwargs, "use_gpu": use_gpu, "planner": planner,
        "threads": max(1, int(cpus_per_worker)) if not use_gpu else None,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks) if callbacks else None,
        ),
    )
    result = trainer.fit()
    record = result.return_value
    if not isinstance(record, dict):
        raise RuntimeError(f"fit_distributed: rank 0 finished without a record (returned {type(record).__name__})")
    if on_epoch is not None:
        for row in record.get("history", []):
            on_epoch(row)
    return record
