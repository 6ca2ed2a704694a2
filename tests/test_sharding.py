"""Sharded TT embedding collections (models.distributed): planning, DMP on 2 gloo processes, and
a fit on 2 Ray Train workers."""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dist_helpers import run_distributed

SIZES = [3000, 2000, 500, 50]  # t0, t1 TT (>= 1000 rows); t2, t3 plain
DIM = 8
B = 6  # samples per rank


def build_model(seed: int = 0):
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from ranksearch.models.tensorized.collection import TTEmbeddingBagCollection

    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate(SIZES)]
    collection = TTEmbeddingBagCollection(tables, format="tt", max_rank=4, min_rows=1000)
    return DLRM(embedding_bag_collection=collection, dense_in_features=4, dense_arch_layer_sizes=[16, DIM],
                over_arch_layer_sizes=[16, 1])


def make_batch(n: int, seed: int, empty=()):
    """dense (n, 4), a KJT with 0-3 ids per sample and feature (none for features in `empty`), labels."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, 4, generator=g)
    lengths = torch.randint(0, 4, (len(SIZES), n), generator=g)
    for i in empty:
        lengths[i] = 0
    values = torch.cat([torch.randint(0, s, (int(lengths[i].sum()),), generator=g) for i, s in enumerate(SIZES)])
    kjt = KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(len(SIZES))], values, lengths.reshape(-1).int())
    return dense, kjt, torch.randint(0, 2, (n,), generator=g).float()


COLLECTION = "sparse_arch.embedding_bag_collection"


def _quiet():
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")


def _sharded_vs_unsharded(rank: int, world: int) -> dict:
    """Runs in each of 2 gloo processes; returns what the parent asserts on."""
    _quiet()
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel, table_wise
    from torchrec.distributed.types import ShardingPlan

    from ranksearch.models.distributed import (
        ShardedTTEmbeddingBagCollection, TTEmbeddingBagCollectionSharder, default_sharders, plan_sharding,
        table_placement,
    )
    from ranksearch.models.distributed.workers import slice_batch

    out: dict = {}
    # 1. TorchRec's planner with the TT estimators, planned on rank 0 and broadcast
    planned = plan_sharding(build_model(), world_size=world, batch_size=64, pg=dist.group.WORLD)
    out["planned"] = table_placement(planned)[COLLECTION]

    # 2. forward and backward against the unsharded model, same init, same global batch
    model = build_model(seed=0)
    reference = copy.deepcopy(model)
    sharder = TTEmbeddingBagCollectionSharder()
    module_plan = construct_module_sharding_plan(
        model.sparse_arch.embedding_bag_collection,
        {"t0": table_wise(rank=0), "t1": table_wise(rank=1), "t2": table_wise(rank=1), "t3": data_parallel()},
        sharder=sharder, local_size=world, world_size=world, device_type="cpu",
    )
    dmp = DistributedModelParallel(model, sharders=default_sharders(), plan=ShardingPlan({COLLECTION: module_plan}),
                                   device=torch.device("cpu"))
    sharded = dmp.module.sparse_arch.embedding_bag_collection
    out["sharded_type"] = type(sharded).__name__
    out["is_sharded"] = isinstance(sharded, ShardedTTEmbeddingBagCollection)
    out["local_tables"] = sorted(sharded.local_tables)
    out["ddp_ignored"] = sorted(getattr(dmp.module, "_ddp_params_and_buffers_to_ignore", []))
    state = dmp.state_dict()
    out["state_keys_ok"] = all(
        torch.equal(state[k], v) for k, v in reference.state_dict().items() if k in state
    )
    out["state_tables"] = sorted({k.split(".")[3] for k in state if k.startswith(f"{COLLECTION}.embedding_bags.")})

    dense, kjt, labels = make_batch(B * world, seed=1)
    mine = slice_batch((dense, kjt, labels), rank, world)
    logits = dmp(mine[0], mine[1])
    F.binary_cross_entropy_with_logits(logits.squeeze(-1), mine[2]).backward()
    ref_logits = reference(dense, kjt)
    F.binary_cross_entropy_with_logits(ref_logits.squeeze(-1), labels).backward()
    lo = rank * B
    out["forward_err"] = (logits - ref_logits[lo:lo + B]).abs().max().item()
    ref_params = dict(reference.named_parameters())
    grads = {}
    for name, p in dmp.named_parameters():
        grads[name] = (p.grad - ref_params[name].grad).abs().max().item() / (ref_params[name].grad.abs().max().item() + 1e-12)
    out["grad_rel_err"] = grads
    pooled = sharded(mine[1])  # the sharded collection alone: a LazyAwaitable[KeyedTensor]
    out["sharded_keys"] = list(pooled.wait().keys())

    # 3. one SGD step on a batch that looks up nothing in t1: only what should change changes
    model = build_model(seed=0)
    reference = copy.deepcopy(model)
    dmp = DistributedModelParallel(model, sharders=default_sharders(), plan=ShardingPlan({COLLECTION: module_plan}),
                                   device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in dmp.named_parameters()}
    optimizer = torch.optim.SGD(dmp.parameters(), lr=0.5)
    dense, kjt, labels = make_batch(B * world, seed=2, empty=(1,))
    mine = slice_batch((dense, kjt, labels), rank, world)
    F.binary_cross_entropy_with_logits(dmp(mine[0], mine[1]).squeeze(-1), mine[2]).backward()
    optimizer.step()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    F.binary_cross_entropy_with_logits(reference(dense, kjt).squeeze(-1), labels).backward()
    ref_opt.step()
    ref_params = dict(reference.named_parameters())
    changed, step_err = {}, {}
    for name, p in dmp.named_parameters():
        changed[name] = bool((p.detach() != before[name]).any())
        step_err[name] = (p.detach() - ref_params[name].detach()).abs().max().item()
    out["changed"], out["step_err"] = changed, step_err
    out["param_checksum"] = {n: float(p.detach().double().sum()) for n, p in dmp.named_parameters()
                             if not n.startswith(f"{COLLECTION}.embedding_bags.t0")
                             and not n.startswith(f"{COLLECTION}.embedding_bags.t1")
                             and not n.startswith(f"{COLLECTION}.embedding_bags.t2")}
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_sharded_vs_unsharded, world_size=2, timeout=240)


def test_planner_puts_tt_tables_on_different_ranks(two_ranks):
    planned = two_ranks[0]["planned"]
    assert planned == two_ranks[1]["planned"]  # collective plan: the same everywhere
    assert {planned["t0"], planned["t1"]} == {0, 1}  # TT tables: table-wise, one per rank
    assert all(planned[t] in (0, 1, "data_parallel") for t in ("t2", "t3"))


def test_dmp_shards_tt_collection_table_wise(two_ranks):
    r0, r1 = two_ranks
    assert r0["is_sharded"] and r1["is_sharded"], r0["sharded_type"]
    assert r0["local_tables"] == ["t0", "t3"]  # t0 owned, t3 replicated
    assert r1["local_tables"] == ["t1", "t2", "t3"]
    # state dict: the unsharded keys (and values) of the tables this rank holds
    assert r0["state_tables"] == ["t0", "t3"] and r1["state_tables"] == ["t1", "t2", "t3"]
    assert r0["state_keys_ok"] and r1["state_keys_ok"]
    # DMP keeps owned TT factors out of DDP; replicated tables and the MLPs stay in it
    assert any(".embedding_bags.t0.weight.factors." in n for n in r0["ddp_ignored"])
    assert not any(".t3." in n for n in r0["ddp_ignored"])
    assert not any(".t0." in n for n in r1["ddp_ignored"])


def test_sharded_forward_and_backward_equal_unsharded(two_ranks):
    for rank, r in enumerate(two_ranks):
        assert r["forward_err"] < 1e-6, (rank, r["forward_err"])
        # owner's TT factor gradients, the replicated table and the DDP-averaged MLP gradients
        bad = {n: e for n, e in r["grad_rel_err"].items() if not e < 1e-5}
        assert not bad, (rank, bad)
    assert any(".t0.weight.factors." in n for n in two_ranks[0]["grad_rel_err"])
    assert any(".t1.weight.factors." in n for n in two_ranks[1]["grad_rel_err"])
    assert list(two_ranks[0]["sharded_keys"]) == ["f0", "f1", "f2", "f3"]  # the unsharded key order


def test_training_step_changes_only_what_it_should(two_ranks):
    r0, r1 = two_ranks
    for rank, r in enumerate(two_ranks):
        bad = {n: e for n, e in r["step_err"].items() if not e < 1e-5}
        assert not bad, (rank, bad)  # the step equals one unsharded step on the global batch
    assert all(c for n, c in r0["changed"].items() if ".t0." in n)  # owned and looked up: trained
    assert not any(c for n, c in r1["changed"].items() if ".t1." in n)  # owned, no ids in the batch: unchanged
    assert any(c for n, c in r1["changed"].items() if ".t2." in n)
    assert not any(".t1." in n for n in r0["changed"]) and not any(".t0." in n for n in r1["changed"])
    assert any(c for n, c in r0["changed"].items() if "dense_arch" in n)
    assert r0["param_checksum"] == r1["param_checksum"]  # replicated parameters stay equal


# ---- planning without processes ---------------------------------------------------------------


def test_planner_sees_tt_tables_as_memory_light_and_compute_heavy():
    _quiet()
    from ranksearch.models.distributed import default_sharders, make_planner, tt_tables

    model = build_model()
    planner = make_planner(model, world_size=2, batch_size=64)
    options = planner._enumerator.enumerate(model, default_sharders())
    tw = {o.name: o for o in options if o.sharding_type == "table_wise"}
    info = tt_tables(model)
    t0 = tw["t0"].shards[0]
    assert t0.storage.ddr < info["t0"].dense_params * 4  # the factors, not rows x dim
    assert {o.sharding_type for o in options if o.name == "t0"} == {"table_wise"}
    assert {o.sharding_type for o in options if o.name == "t3"} == {"table_wise", "data_parallel"}
    assert tw["t0"].shards[0].perf.total > 2 * tw["t2"].shards[0].perf.total  # TT rows cost compute


def test_balanced_plan_and_kaggle_scale_planning():
    _quiet()
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from ranksearch.models.data.criteo import KAGGLE_TABLE_SIZES
    from ranksearch.models.distributed import balanced_table_wise_plan, plan_sharding, table_placement, tt_tables
    from ranksearch.models.tensorized.collection import TTEmbeddingBagCollection

    placed = table_placement(balanced_table_wise_plan(build_model(), world_size=2))[COLLECTION]
    assert {placed["t0"], placed["t1"]} == {0, 1}
    assert set(placed.values()) <= {0, 1}

    # 26 Criteo Kaggle tables at dim 128 (4e9 dense parameters), large ones TT: planned in seconds
    tables = [EmbeddingBagConfig(name=f"k{i}", embedding_dim=128, num_embeddings=n, feature_names=[f"cat_{i}"])
              for i, n in enumerate(KAGGLE_TABLE_SIZES)]
    model = DLRM(embedding_bag_collection=TTEmbeddingBagCollection(tables, format="ttm", max_rank=16),
                 dense_in_features=13, dense_arch_layer_sizes=[64, 128], over_arch_layer_sizes=[64, 1])
    tt = [n for n, i in tt_tables(model).items() if i.is_tt]
    assert len(tt) == 7
    for world in (2, 4):
        placed = table_placement(plan_sharding(model, world_size=world, batch_size=1024))[COLLECTION]
        ranks = [placed[n] for n in tt]
        assert set(ranks) == set(range(world))  # TT tables spread over every rank
        counts = [ranks.count(r) for r in range(world)]
        assert max(counts) - min(counts) <= 1 + (world == 4)


def test_slice_batch_splits_kjt_rows():
    from ranksearch.models.distributed.workers import slice_batch, slice_kjt

    dense, kjt, labels = make_batch(5, seed=3)
    parts = [slice_batch((dense, kjt, labels), r, 2) for r in range(2)]
    assert [p[0].shape[0] for p in parts] == [2, 3]
    for key in kjt.keys():
        whole = kjt[key].to_dense()
        got = [t for p in parts for t in p[1][key].to_dense()]
        assert all(torch.equal(a, b) for a, b in zip(whole, got)) and len(got) == len(whole)
    assert torch.equal(torch.cat([p[2] for p in parts]), labels)
    assert slice_kjt(kjt, 1, 1).stride() == 0


def test_sharder_contract():
    from torchrec.distributed.types import ShardingType

    from ranksearch.models.distributed import TTEmbeddingBagCollectionSharder
    from ranksearch.models.tensorized.collection import TTEmbeddingBagCollection

    sharder = TTEmbeddingBagCollectionSharder()
    model = build_model()
    assert sharder.module_type is TTEmbeddingBagCollection
    params = sharder.shardable_parameters(model.sparse_arch.embedding_bag_collection)
    assert list(params) == ["t0", "t1", "t2", "t3"]
    assert params["t0"].is_meta and tuple(params["t0"].shape) == (3000, DIM)  # no dense TT table allocated
    assert params["t2"] is model.sparse_arch.embedding_bag_collection.embedding_bags["t2"].weight
    assert set(sharder.sharding_types("cpu")) == {ShardingType.TABLE_WISE.value, ShardingType.DATA_PARALLEL.value}
    assert sharder.compute_kernels(ShardingType.TABLE_WISE.value, "cpu") == ["customized_kernel"]


# ---- a fit on 2 Ray Train workers ---------------------------------------------------------------


SMALL_DLRM = dict(
    model="dlrm", dataset="synthetic-criteo", format="tt", budget=0.5,
    train={"epochs": 1, "batch_size": 256, "lr": 0.01, "max_rank": 4, "finetune_epochs": 1},
    dataset_options={"num_samples": 3000, "table_sizes": [3000, 2000, 500, 50] + [10] * 22},
    model_options={"embedding_dim": 8, "min_rows": 1000, "dense_arch": [16], "over_arch": [16]},
)


@pytest.mark.slow
def test_fit_distributed_in_a_tune_trial(ray_session, tmp_path, monkeypatch):
    """What the orchestrator does for resources.workers > 1: a Tune trial (the Train driver, a
    fraction of a CPU) runs fit_distributed on 2 TorchTrainer workers; epoch rows reach Tune."""
    from ray import tune

    # run_search (earlier tests, same process) turns Tune's file loggers off; this test reads
    # the per-epoch rows back through them
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)

    storage = str(tmp_path)

    def trainable(config):  # defined here: pickled by value for the trial actor
        from ray.tune.integration.ray_train import TuneReportCallback

        from ranksearch.models.distributed import fit_distributed

        record = fit_distributed(num_workers=2, use_gpu=False, cpus_per_worker=0.9, storage_path=storage,
                                 name="inner", callbacks=[TuneReportCallback()], **config)
        tune.report({
            "final_auc": record["auc"], "final_logloss": record["logloss"], "budget_met": record["budget_met"],
            "epochs_done": record["epochs_done"], "world_size": record["distributed"]["world_size"],
            "backend": record["distributed"]["backend"], "tables_ranked": len(record["ranks"]),
            "tt_owners": json.dumps(record["distributed"]["placements"][-1]["tables"]),
        })

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.2}),
        param_space={"method": "fixed", **copy.deepcopy(SMALL_DLRM)},
        run_config=tune.RunConfig(storage_path=storage, name="outer", verbose=0),
    )
    result = tuner.fit()[0]
    assert result.error is None, result.error
    final = result.metrics
    assert final["world_size"] == 2 and final["backend"] == "gloo"
    assert 0.5 < final["final_auc"] <= 1 and math.isfinite(final["final_logloss"])
    assert final["budget_met"] is True and final["epochs_done"] == 2 and final["tables_ranked"] == 2
    owners = json.loads(final["tt_owners"])[COLLECTION]
    assert {owners["t_cat_0"], owners["t_cat_1"]} == {0, 1}  # the two TT tables, one per worker
    rows = result.metrics_dataframe
    epochs = rows[rows["epoch"].notna()]  # the workers' epoch rows, forwarded live to Tune
    assert list(epochs["epoch"]) == [1, 2] and epochs["val_auc"].notna().all()
