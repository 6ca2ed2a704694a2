"""DLRM with TT-embedding tables: the collection against TorchRec's, the model, the full Criteo
Kaggle configuration in little memory, `fit` end to end, and option validation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

torchrec = pytest.importorskip("torchrec")

from torchrec import EmbeddingBagCollection  # noqa: E402
from torchrec.models.dlrm import DLRM, DLRM_DCN  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from ranksearch.models.data.criteo import make_batch  # noqa: E402
from ranksearch.models.rec_task import RecTask, binary_metrics  # noqa: E402
from ranksearch.models.tensorized import FactorizedEmbeddingBag, factorized_layers  # noqa: E402
from ranksearch.models.zoo import build_model  # noqa: E402
from ranksearch.models.zoo.dlrm import build_dlrm, embedding_summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = [3000, 1200, 700, 50, 20, 5]  # 3 tables >= min_rows=500 are factorized
TINY = dict(embedding_dim=8, dense_arch=[16], over_arch=[16], min_rows=500)
# 26 tables for the synthetic data: the 4 largest (the signal tables) factorized at min_rows=1000
SYNTH_SIZES = [4096, 2000, 1500, 1000] + [50, 20, 10, 5] * 5 + [3, 2]


def _kjt(sizes, batch: int, seed: int, max_len: int = 3) -> KeyedJaggedTensor:
    """Jagged bags of 0..max_len ids per sample and feature (empty bags included)."""
    g = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for n in sizes:
        lens = torch.randint(0, max_len + 1, (batch,), generator=g)
        lengths.append(lens)
        values.append(torch.randint(0, n, (int(lens.sum()),), generator=g))
    return KeyedJaggedTensor.from_lengths_sync([f"cat_{i}" for i in range(len(sizes))], torch.cat(values),
                                               torch.cat(lengths).int())


def _dense_twin(collection) -> EmbeddingBagCollection:
    """TorchRec's EmbeddingBagCollection with the same configs, loaded with the materialized tables."""
    ebc = EmbeddingBagCollection(tables=collection.embedding_bag_configs())
    with torch.no_grad():
        for name, bag in collection.embedding_bags.items():
            weight = bag.dense_weight() if isinstance(bag, FactorizedEmbeddingBag) else bag.weight
            ebc.embedding_bags[name].weight.copy_(weight)
    return ebc


def test_tt_collection_matches_torchrec_ebc_on_materialized_tables():
    net = build_dlrm(SIZES, format="ttm", max_rank=4, **TINY)
    collection = net.sparse_arch.embedding_bag_collection
    kinds = {n: type(b).__name__ for n, b in collection.embedding_bags.items()}
    assert [k for k in kinds.values()].count("FactorizedEmbeddingBag") == 3
    features = _kjt(SIZES, batch=7, seed=1)
    ours, theirs = collection(features), _dense_twin(collection)(features)
    assert ours.keys() == theirs.keys() == [f"cat_{i}" for i in range(len(SIZES))]
    assert ours.length_per_key() == theirs.length_per_key() == [8] * len(SIZES)
    assert ours.values().shape == theirs.values().shape == (7, 8 * len(SIZES))
    torch.testing.assert_close(ours.values(), theirs.values(), rtol=1e-5, atol=1e-6)
    for key in ours.keys():
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["tt", "cp", "tucker"])
def test_other_formats_match_too(fmt):
    net = build_dlrm(SIZES[:3] + [10], format=fmt, max_rank=3, **TINY)
    collection = net.sparse_arch.embedding_bag_collection
    features = _kjt(SIZES[:3] + [10], batch=5, seed=2)
    torch.testing.assert_close(collection(features).values(), _dense_twin(collection)(features).values(),
                               rtol=1e-5, atol=1e-6)


def test_dlrm_forward_backward_equals_torchrec_dlrm_with_dense_tables():
    torch.manual_seed(0)
    net = build_dlrm(SIZES, format="ttm", max_rank=4, **TINY)
    assert isinstance(net, DLRM)
    twin = DLRM(embedding_bag_collection=_dense_twin(net.sparse_arch.embedding_bag_collection),
                dense_in_features=13, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    mlp_state = {k: v for k, v in net.state_dict().items() if not k.startswith("sparse_arch")}
    twin.load_state_dict(mlp_state, strict=False)
    dense, sparse = torch.randn(7, 13), _kjt(SIZES, batch=7, seed=3)
    logits = net(dense, sparse)
    assert logits.shape == (7, 1)
    torch.testing.assert_close(logits, twin(dense, sparse), rtol=1e-4, atol=1e-5)

    logits.sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
    tt = net.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_0"]
    assert all(f.grad.abs().sum() > 0 for f in tt.weight.factors)


def test_dcn_arch_and_layer_sizes():
    net = build_dlrm(SIZES, format="ttm", max_rank=2, arch="dcn", dcn_num_layers=2, dcn_low_rank_dim=4, **TINY)
    assert isinstance(net, DLRM_DCN)
    assert net(torch.randn(4, 13), _kjt(SIZES, 4, seed=4)).shape == (4, 1)
    # final sizes appended: bottom MLP ends at embedding_dim, top MLP at 1
    linears = [m for m in net.dense_arch.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [16, 8]


def test_dense_build_is_all_plain_and_counts_equal():
    net = build_dlrm(SIZES, format=None, **TINY)
    assert not factorized_layers(net)
    summary = embedding_summary(net)
    assert summary["embedding_params"] == summary["embedding_dense_params"] == sum(SIZES) * 8
    # posthoc's dense phase: tensorize may replace exactly the tables >= min_rows
    assert net.tensorize_options["include"] == [
        f"sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{i}" for i in range(3)
    ]


def test_embedding_summary_counts_kept_slices():
    net = build_dlrm(SIZES, format="ttm", max_rank=4, **TINY)
    s = embedding_summary(net)
    assert s["embedding_dense_params"] == sum(SIZES) * 8
    tt = net.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_0"]
    before = s["embedding_params"]
    tt.weight.set_mask(0, torch.arange(4) < 1)
    after = embedding_summary(net)["embedding_params"]
    assert after == before - (tt.num_parameters(effective=False) - tt.num_parameters())
    assert after < before
    row = next(t for t in embedding_summary(net)["tables"] if t["table"] == "t_cat_0")
    assert row["factorized"] and row["ranks"] == [1, 4] and row["rows"] == 3000


def test_table_options_per_table_and_feature_names():
    net = build_dlrm(SIZES, format="ttm", max_rank=4,
                     table_options={"cat_4": {"format": "tt", "max_rank": 2},
                                    "t_cat_0": {"shape": [[10, 15, 20], [2, 2, 2]], "max_rank": [3, 5]}},
                     **TINY)
    bags = net.sparse_arch.embedding_bag_collection.embedding_bags
    assert isinstance(bags["t_cat_4"], FactorizedEmbeddingBag) and bags["t_cat_4"].format == "tt"  # 20 rows, named
    assert bags["t_cat_0"].row_shape == [10, 15, 20] and bags["t_cat_0"].max_ranks == [3, 5]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(table_options={"t_cat_99": {"max_rank": 2}}), "table_options.t_cat_99"),
        (dict(table_options={"cat_0": {"rank": 2}}), "table_options.cat_0"),
        (dict(table_options={"cat_0": {"format": "qr"}}), "table_options.cat_0.format"),
        (dict(table_options={"cat_0": {"max_rank": 0}}), "table_options.cat_0.max_rank"),
        (dict(table_options={"cat_0": {"shape": [[10, 10]]}}), "table_options.cat_0.shape"),
        (dict(table_options={"cat_0": {"shape": [[10, -3, 5], None]}}), "table_options.cat_0.shape[0][1]"),
        (dict(table_options={"cat_0": {"shape": [[10, 10, 10], [2, 2, 2]]}}), "table_options.t_cat_0.shape[0]"),
        (dict(table_options={"cat_0": 4}), "table_options.cat_0"),
        (dict(table_options=[1]), "table_options"),
        (dict(format="tensor"), "format"),
        (dict(max_rank=0), "max_rank"),
        (dict(min_rows=0), "min_rows"),
        (dict(embedding_dim=2.5), "embedding_dim"),
        (dict(dense_arch=[16, 0]), "dense_arch[1]"),
        (dict(over_arch=[]), "over_arch"),
        (dict(arch="dlrm2"), "arch"),
        (dict(tensorize_mlp="yes"), "tensorize_mlp"),
    ],
)
def test_malformed_options_raise_value_error_naming_the_field(kwargs, field):
    options = {**TINY, **kwargs}
    with pytest.raises(ValueError, match=r"^" + field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        build_dlrm(SIZES, **{"format": "ttm", "max_rank": 4, **options})


def test_bad_table_sizes():
    with pytest.raises(ValueError, match=r"^table_sizes\[1\]"):
        build_dlrm([10, 0, 5])
    with pytest.raises(ValueError, match=r"^table_sizes"):
        build_dlrm([])


def test_build_model_dispatches_to_build_dlrm():
    net = build_model("dlrm", table_sizes=SIZES, format="ttm", max_rank=2, **TINY)
    assert isinstance(net, DLRM)


# ---- the full Criteo Kaggle configuration -----------------------------------------------------

FULL_SIZE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from ranksearch.models.data.criteo import KAGGLE_TABLE_SIZES, make_batch
    from ranksearch.models.zoo.dlrm import build_dlrm, embedding_summary

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    base = status("VmRSS:")
    net = build_dlrm(KAGGLE_TABLE_SIZES, embedding_dim=128, format="ttm", max_rank=16, min_rows=10_000,
                     dense_arch=[512, 256], over_arch=[1024, 1024, 512, 256])
    built = status("VmRSS:") - base
    summary = embedding_summary(net)
    g = torch.Generator().manual_seed(0)
    B = 256
    ids = torch.stack([torch.randint(0, n, (B,), generator=g) for n in KAGGLE_TABLE_SIZES], 1)
    ids[0] = torch.tensor(KAGGLE_TABLE_SIZES) - 1  # the last row of every table
    batch = make_batch(torch.rand(B, 13), ids, torch.randint(0, 2, (B,), generator=g).float())
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = [f.detach().clone() for f in net.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_2"].weight.factors]
    for _ in range(2):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(batch.dense, batch.sparse).reshape(-1), batch.labels)
        opt.zero_grad(); loss.backward(); opt.step()
    after = net.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_2"].weight.factors
    json.dump({"built": built, "peak": status("VmHWM:") - base, "loss": float(loss.detach()),
               "changed": all(not torch.equal(a, b) for a, b in zip(after, before)),
               "params": summary["embedding_params"], "dense": summary["embedding_dense_params"],
               "factorized": sum(t["factorized"] for t in summary["tables"])}, sys.stdout)
    """
)


def test_full_criteo_kaggle_config_builds_and_trains_in_little_memory():
    out = subprocess.run([sys.executable, "-c", FULL_SIZE_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dense"] > 4.3e9  # ~4.3e9 dense embedding parameters at dim 128 (17 GB in fp32) ...
    assert r["params"] < 5e6  # ... of which only a few million exist
    assert r["factorized"] == 10  # the tables of >= 10^4 rows
    assert r["built"] < 512 * 2**20, r
    assert r["peak"] < 2 * 2**30, r  # build + 2 Adam steps: nothing of dense size is ever allocated
    assert math.isfinite(r["loss"]) and r["changed"]


# ---- the task and fit ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth():
    from ranksearch.models.data import load_dataset

    return load_dataset("synthetic-criteo", num_samples=3000, table_sizes=SYNTH_SIZES, seed=0)


def test_binary_metrics_match_sklearn():
    from sklearn.metrics import log_loss, roc_auc_score

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(500, generator=g) < 0.3).float()
    logits = labels * 0.8 + torch.randn(500, generator=g)
    m = binary_metrics(logits, labels)
    assert m["auc"] == pytest.approx(roc_auc_score(labels.numpy(), logits.numpy()))
    assert m["logloss"] == pytest.approx(log_loss(labels.numpy(), torch.sigmoid(logits).numpy()), rel=1e-6)
    assert m["accuracy"] == pytest.approx(float(((logits > 0).float() == labels).float().mean()))
    assert math.isnan(binary_metrics(logits, torch.zeros(500))["auc"])


def test_rec_task_batches_splits_and_lwiq_shape(synth):
    task = RecTask(synth, batch_size=128, seed=0, device=torch.device("cpu"))
    assert task.model_kwargs() == {"table_sizes": SYNTH_SIZES, "num_dense": 13}
    train = set(task.train_idx.tolist())
    assert not train & set(task.val_idx.tolist()) and not train & set(task.test_idx.tolist())
    assert len(train) + len(task.val_idx) == len(synth.split_range("train"))
    (dense, sparse), y = next(iter(task.train_batches(0)))
    assert dense.shape == (128, 13) and y.shape == (128,) and sparse.keys()[0] == "cat_0"
    first0 = next(iter(task.train_batches(0)))[1]
    first1 = next(iter(task.train_batches(1)))[1]
    assert not torch.equal(first0, first1)  # reshuffled per epoch
    x, y = next(iter(task.heldout_batches()))  # LWIQ calls model(*x) on (x, y) pairs
    net = build_dlrm(SYNTH_SIZES, format="ttm", max_rank=2, **{**TINY, "min_rows": 1000})
    assert net(*x).shape == (len(y), 1)
    assert task.loss(net, (x, y)).shape == ()
    metrics = task.evaluate(net)
    assert {"auc", "logloss", "accuracy", "embedding_params", "embedding_dense_params", "tables"} <= set(metrics)


FIT = dict(model="dlrm", dataset="synthetic-criteo", format="ttm",
           train={"epochs": 2, "finetune_epochs": 1, "batch_size": 256, "max_rank": 4},
           model_options={**TINY, "min_rows": 1000})


def _check_record(r, method):
    assert r["model"] == "dlrm" and r["method"] == method
    for key in ("auc", "logloss", "accuracy"):
        assert 0 <= r[key] <= (1 if key != "logloss" else 5), (key, r[key])
    assert r["auc"] > 0.5  # learns something in 3 tiny epochs
    assert r["params"] < r["dense_params"] and r["compression"] > 1
    assert r["embedding_params"] < r["embedding_dense_params"] == sum(SYNTH_SIZES) * 8
    assert r["budget_met"] is True and r["tensorized_params"] <= r["budget_params"]
    tables = {f"sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{i}" for i in range(4)}
    assert set(r["ranks"]) == tables  # one entry per factorized table
    assert all(1 <= k <= 4 for ranks in r["ranks"].values() for k in ranks)
    json.dumps(r, default=str)


@pytest.mark.parametrize("method", ["fixed", "lwiq"])
def test_fit_dlrm_on_synthetic(synth, method):
    from ranksearch.models.train import fit

    r = fit(method=method, budget=0.01, data=synth, **FIT)
    _check_record(r, method)
    if method == "fixed":
        assert len({tuple(v) for v in r["ranks"].values()}) == 1  # one rank everywhere
    else:
        assert r["method_state"]["measure_samples"] > 0


def test_fit_dlrm_dense_baseline_and_mlp_tensorization(synth):
    from ranksearch.models.train import fit

    dense = fit(method="dense", data=synth, **FIT)
    assert dense["ranks"] == {} and dense["compression"] == 1.0
    assert dense["embedding_params"] == dense["embedding_dense_params"]
    assert 0 <= dense["auc"] <= 1

    options = {**FIT["model_options"], "tensorize_mlp": True, "dense_arch": [32], "over_arch": [32]}
    both = fit(method="fixed", budget=0.2, data=synth, **{**FIT, "model_options": options,
                                                          "train": {**FIT["train"], "epochs": 1}})
    assert any(name.startswith("over_arch") for name in both["ranks"])  # MLP searched with the tables
    assert both["budget_met"] is True


def test_fit_rejects_format_in_model_options(synth):
    from ranksearch.models.train import fit

    with pytest.raises(ValueError, match="model_options"):
        fit(method="fixed", data=synth, **{**FIT, "model_options": {"max_rank": 3}})


def test_fit_dlrm_on_raw_criteo_tsv(tmp_path):
    """`criteo:PATH` end to end: raw TSV lines (some fields empty), hashed into small tables."""
    from ranksearch.models.train import fit

    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(600):
        ints = [str(int(v)) if v % 7 else "" for v in torch.randint(0, 50, (13,), generator=g)]
        cats = [f"{int(v):08x}" if v % 11 else "" for v in torch.randint(0, 2**31, (26,), generator=g)]
        label = int(torch.rand(1, generator=g) < 0.3 + 0.4 * (int(cats[0] or "0", 16) % 2))
        lines.append("\t".join([str(label), *ints, *cats]))
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    r = fit(model="dlrm", dataset=f"criteo:{path}", method="fixed", format="ttm", budget=0.5,
            dataset_options={"table_sizes": SYNTH_SIZES},
            train={"epochs": 1, "finetune_epochs": 0, "batch_size": 128, "max_rank": 2},
            model_options={**TINY, "min_rows": 1000})
    assert r["dataset"].startswith("criteo:") and 0 <= r["auc"] <= 1 and r["budget_met"]
    assert len(r["ranks"]) == 4


def test_saved_compressed_dlrm_reloads_without_dense_tables(synth, tmp_path):
    from ranksearch.models.checkpoint import load_compressed
    from ranksearch.models.train import fit

    path = tmp_path / "dlrm.pt"
    r = fit(method="fixed", budget=0.01, data=synth, save=str(path),
            **{**FIT, "train": {**FIT["train"], "epochs": 1, "finetune_epochs": 0}})
    net, record = load_compressed(str(path))
    assert record["auc"] == r["auc"]
    assert embedding_summary(net)["embedding_params"] == r["embedding_params"]
    task = RecTask(synth, batch_size=256, seed=0, device=torch.device("cpu"))
    assert task.evaluate(net)["auc"] == pytest.approx(r["auc"], abs=1e-9)
