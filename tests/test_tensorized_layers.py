"""Factorized layers: function equal to the dense layer they stand for, gradients, rank
masks and pruning, memory of huge tables, argument checking, initialization, FLOPs."""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ranksearch.models.tensorized import (
    FORMATS,
    FactorizedConv2d,
    FactorizedEmbedding,
    FactorizedEmbeddingBag,
    FactorizedLinear,
    build_tensor,
)

ROOT = Path(__file__).resolve().parents[1]


def table_of(bag: FactorizedEmbeddingBag) -> torch.Tensor:
    """The (small) table materialized straight from the factors, independent of the layer's code."""
    full = bag.weight.full().reshape(math.prod(bag.row_shape), math.prod(bag.col_shape))
    return full[: bag.num_embeddings, : bag.embedding_dim]


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    if a.numel():
        assert float((a - b).detach().abs().max()) <= tol * scale, float((a - b).detach().abs().max())


from torch_fixtures import _one_thread, _seed  # noqa: F401  (autouse fixtures)


# ---- forward == dense computation -----------------------------------------------------------

LINEAR_CASES = [
    dict(in_features=10, out_features=13),  # automatic shapes, 13 prime
    dict(in_features=24, out_features=36, in_shape=[2, 3, 4], out_shape=[3, 3, 4]),
    dict(in_features=20, out_features=30, in_shape=[3, 7], out_shape=[4, 8]),  # padded both ways
    dict(in_features=64, out_features=10, bias=False),
    dict(in_features=1, out_features=5),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", range(len(LINEAR_CASES)))
def test_linear_forward_equals_dense(fmt, case):
    kw = LINEAR_CASES[case]
    layer = FactorizedLinear(**kw, format=fmt, max_rank=3).double()
    w = layer.dense_weight()
    assert w.shape == (kw["out_features"], kw["in_features"])
    for lead in [(7,), (2, 3), ()]:
        x = torch.randn(*lead, kw["in_features"], dtype=torch.float64)
        close(layer(x), F.linear(x, w, layer.bias))


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_forward_float32_and_nn_linear(fmt):
    """The default dtype path, and the same numbers through a real nn.Linear holding dense_weight()."""
    layer = FactorizedLinear(784, 512, format=fmt, max_rank=8)
    ref = nn.Linear(784, 512)
    with torch.no_grad():
        ref.weight.copy_(layer.dense_weight())
        ref.bias.copy_(layer.bias)
    x = torch.randn(16, 784)
    close(layer(x), ref(x), tol=1e-5)


CONV_CASES = [
    dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1, dilation=2),
    dict(in_channels=6, out_channels=8, kernel_size=1),
    dict(in_channels=5, out_channels=7, kernel_size=1, stride=2, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=(1, 2), padding=(1, 0)),
    dict(in_channels=3, out_channels=16, kernel_size=5, padding=2, in_shape=[3], out_shape=[4, 4]),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_forward_equals_dense(fmt, case):
    kw = dict(CONV_CASES[case])
    if fmt == "ttm" and "in_shape" in kw:
        kw["in_shape"] = [1, 3]
    layer = FactorizedConv2d(**kw, format=fmt, max_rank=3).double()
    w = layer.dense_weight()
    k = kw["kernel_size"]
    kh, kw_ = (k, k) if isinstance(k, int) else k
    assert w.shape == (kw["out_channels"], kw["in_channels"], kh, kw_)
    x = torch.randn(2, kw["in_channels"], 11, 10, dtype=torch.float64)
    ref = F.conv2d(x, w, layer.bias, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1))
    close(layer(x), ref)


TABLE_CASES = [
    dict(num_embeddings=100, embedding_dim=12),
    dict(num_embeddings=97, embedding_dim=10),  # prime rows: padded table
    dict(num_embeddings=100, embedding_dim=12, shape=[[5, 5, 4], [2, 2, 3]]),
    dict(num_embeddings=60, embedding_dim=7, shape=[[4, 4, 4], [2, 2, 2]]),  # padded explicit
]

BAGS = dict(  # (ids, offsets): empty bags, a single bag, repeated ids
    general=([3, 3, 50, 0, 99, 7, 7, 7, 12, 1, 2], [0, 3, 3, 8]),
    single=([5, 9, 5], [0]),
    empty_last=([1, 2, 3], [0, 3]),
)


def _ids(ids, n):
    return torch.tensor([i % n for i in ids])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", range(len(TABLE_CASES)))
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_equals_dense(fmt, case, mode):
    kw = TABLE_CASES[case]
    bag = FactorizedEmbeddingBag(**kw, format=fmt, max_rank=3, mode=mode).double()
    table = table_of(bag)
    assert table.shape == (kw["num_embeddings"], kw["embedding_dim"])
    close(bag.dense_weight(), table)
    n = kw["num_embeddings"]
    for ids, offsets in BAGS.values():
        ids, offsets = _ids(ids, n), torch.tensor(offsets)
        close(bag(ids, offsets), F.embedding_bag(ids, table, offsets, mode=mode))
    # 2-D input: bags of equal length
    ids2 = torch.randint(0, n, (6, 4))
    close(bag(ids2), F.embedding_bag(ids2, table, mode=mode))
    # no ids at all: every bag empty
    empty = torch.zeros(0, dtype=torch.long)
    close(bag(empty, torch.tensor([0, 0])), F.embedding_bag(empty, table, torch.tensor([0, 0]), mode=mode))
    # int32 ids and offsets
    ids, offsets = _ids(BAGS["general"][0], n), torch.tensor(BAGS["general"][1])
    close(bag(ids.int(), offsets.int()), F.embedding_bag(ids, table, offsets, mode=mode))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_include_last_offset(fmt, mode):
    bag = FactorizedEmbeddingBag(100, 12, format=fmt, max_rank=3, mode=mode, include_last_offset=True).double()
    table = table_of(bag)
    ids, offsets = torch.tensor([3, 3, 50, 0, 99, 7, 7, 7, 12]), torch.tensor([0, 3, 3, 8, 9])
    close(bag(ids, offsets), F.embedding_bag(ids, table, offsets, mode=mode, include_last_offset=True))
    ref = nn.EmbeddingBag.from_pretrained(table, mode=mode, include_last_offset=True)
    close(bag(ids, offsets), ref(ids, offsets))
    # 2-D input ignores include_last_offset, as nn.EmbeddingBag does
    ids2 = torch.randint(0, 100, (5, 3))
    assert bag(ids2).shape == (5, 12)
    close(bag(ids2), ref(ids2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_bag_per_sample_weights(fmt):
    bag = FactorizedEmbeddingBag(100, 12, format=fmt, max_rank=3, mode="sum").double()
    table = table_of(bag)
    ids, offsets = torch.tensor([3, 3, 50, 0, 99, 7, 7, 7, 12]), torch.tensor([0, 3, 3, 8])
    psw = torch.rand(len(ids), dtype=torch.float64)
    close(bag(ids, offsets, psw), F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=psw))
    ids2, psw2 = torch.randint(0, 100, (4, 5)), torch.rand(4, 5, dtype=torch.float64)
    close(bag(ids2, per_sample_weights=psw2), F.embedding_bag(ids2, table, mode="sum", per_sample_weights=psw2))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("mode", "weighted"), [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("last", [False, True])
def test_bags_of_one_id_match_the_dense_table_with_gradients(fmt, mode, weighted, last):
    """One id per bag (DLRM features) takes pooling.py's index_add backward: values and factor
    gradients equal nn.EmbeddingBag over the materialized table."""
    bag = FactorizedEmbeddingBag(100, 12, format=fmt, max_rank=3, mode=mode, include_last_offset=last).double()
    ids = torch.tensor([3, 3, 50, 0, 99, 7, 12])
    offsets = torch.arange(len(ids) + (1 if last else 0))
    psw = torch.rand(len(ids), dtype=torch.float64) if weighted else None
    upstream = torch.randn(len(ids), 12, dtype=torch.float64)
    grads = []
    for use_table in (False, True):
        bag.zero_grad()
        out = (F.embedding_bag(ids, table_of(bag), offsets, mode=mode, per_sample_weights=psw, include_last_offset=last)
               if use_table else bag(ids, offsets, psw))
        out.backward(upstream)
        grads.append((out.detach(), [p.grad.clone() for p in bag.weight.factors]))
    close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        close(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_lookup_equals_dense(fmt):
    emb = FactorizedEmbedding(97, 10, format=fmt, max_rank=3).double()
    table = table_of(emb)
    for ids in [torch.randint(0, 97, (5, 7)), torch.tensor([96, 0, 96]), torch.tensor(4), torch.zeros(0, dtype=torch.long)]:
        close(emb(ids), F.embedding(ids, table))
    close(emb.rows(torch.arange(97)), table)


# ---- gradients -------------------------------------------------------------------------------


def _gradcheck_params(layer, x):
    """gradcheck in float64 with respect to every parameter (factors, bias) and the input."""
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(*args):
        return functional_call(layer, dict(zip(names, args[:-1])), (args[-1],))

    assert torch.autograd.gradcheck(f, (*params, x), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_linear(fmt):
    layer = FactorizedLinear(6, 5, format=fmt, max_rank=2, in_shape=[2, 3], out_shape=[1, 5]).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    _gradcheck_params(layer, x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_conv(fmt):
    layer = FactorizedConv2d(2, 4, 3, format=fmt, max_rank=2, padding=1, stride=2).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)  # input grads are F.conv2d's own: factors only
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(
        lambda *ps: functional_call(layer, dict(zip(names, ps)), (x,)), tuple(params), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_gradcheck_embedding_bag(fmt, mode):
    bag = FactorizedEmbeddingBag(30, 6, format=fmt, max_rank=2, mode=mode, shape=[[2, 3, 5], [1, 2, 3]]).double()
    ids, offsets = torch.tensor([1, 1, 29, 4, 17]), torch.tensor([0, 2, 2])
    names = [n for n, _ in bag.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in bag.parameters()]

    def f(*factors):
        return functional_call(bag, dict(zip(names, factors)), (ids, offsets))

    assert torch.autograd.gradcheck(f, tuple(params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_factor_grads_match_the_dense_path(fmt):
    """Backward through the factorized contraction == backward through dense_weight()."""
    layer = FactorizedLinear(784, 64, format=fmt, max_rank=4).double()
    x = torch.randn(8, 784, dtype=torch.float64)
    target = torch.randn(8, 64, dtype=torch.float64)
    grads = []
    for path in ("factorized", "dense"):
        layer.zero_grad()
        y = layer(x) if path == "factorized" else F.linear(x, layer.dense_weight(), layer.bias)
        ((y - target) ** 2).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        close(a, b, tol=1e-9)


@pytest.mark.parametrize("fmt", FORMATS)
def test_per_sample_weight_grads(fmt):
    bag = FactorizedEmbeddingBag(50, 6, format=fmt, max_rank=2).double()
    ids, offsets = torch.tensor([1, 1, 49, 4]), torch.tensor([0, 3])
    psw = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: bag(ids, offsets, w), (psw,), eps=1e-6, atol=1e-6)


# ---- masks and pruning -----------------------------------------------------------------------


def _layers(fmt):
    return [
        FactorizedLinear(24, 36, format=fmt, max_rank=4, in_shape=[2, 3, 4], out_shape=[3, 3, 4]),
        FactorizedLinear(10, 13, format=fmt, max_rank=3),
        FactorizedConv2d(8, 16, 3, format=fmt, max_rank=4, padding=1),
        FactorizedEmbeddingBag(100, 12, format=fmt, max_rank=4),
    ]


def _inputs(layer):
    if isinstance(layer, FactorizedLinear):
        return (torch.randn(5, layer.in_features, dtype=torch.float64),)
    if isinstance(layer, FactorizedConv2d):
        return (torch.randn(2, layer.in_channels, 6, 6, dtype=torch.float64),)
    return torch.tensor([0, 5, 99, 42, 42, 7]), torch.tensor([0, 2, 2])


def _single_slice_params(t, edge: int) -> int:
    """Parameters one slice of `edge` owns, written out per format (independent of num_parameters)."""
    modes, r = t.modes, t.ranks
    if t.format == "cp":
        return sum(modes)
    if t.format == "tucker":
        return modes[edge] + math.prod(r) // r[edge]
    # tt / ttm: trailing slice of core `edge`, leading slice of core `edge + 1`
    left = [1] + r
    right = r + [1]
    size = [math.prod(modes[i] for i in g) for g in t.groups]
    return left[edge] * size[edge] + size[edge + 1] * right[edge + 1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_ranks_and_ranks(fmt):
    layer = FactorizedLinear(24, 36, format=fmt, max_rank=4, in_shape=[2, 3, 4], out_shape=[3, 3, 4])
    expected = {
        "cp": [4],
        "tucker": [3, 3, 4, 2, 3, 4],  # capped by each mode size
        "tt": [3, 4, 4, 4, 4],  # modes [3,3,4,2,3,4]: first edge capped at 3
        "ttm": [4, 4],  # cores (3x2), (3x3), (4x4)
    }[fmt]
    assert layer.max_ranks == expected
    assert layer.ranks == expected
    assert layer.weight.num_edges == len(expected)
    big = FactorizedLinear(24, 36, format=fmt, max_rank=1000, in_shape=[2, 3, 4], out_shape=[3, 3, 4])
    if fmt == "tt":  # caps: min(prod of modes left, prod right) on each edge
        assert big.max_ranks == [3, 9, 24, 12, 4]
    if fmt == "ttm":
        assert big.max_ranks == [6, 16]
    explicit = FactorizedLinear(24, 36, format=fmt, max_rank=[2] * len(expected), in_shape=[2, 3, 4], out_shape=[3, 3, 4])
    assert explicit.max_ranks == [2] * len(expected)
    # num_parameters(effective=False) is the real parameter count
    for l in (layer, big, explicit):
        assert l.num_parameters(effective=False) == sum(p.numel() for p in l.parameters())
        assert l.num_parameters() == l.num_parameters(effective=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_masking_one_slice_reduces_effective_params_exactly(fmt):
    for layer in _layers(fmt):
        t = layer.weight
        for edge in range(t.num_edges):
            if t.max_ranks[edge] < 2:
                continue
            before = layer.num_parameters()
            owned = _single_slice_params(t, edge)
            keep = torch.ones(t.max_ranks[edge], dtype=torch.bool)
            keep[1] = False
            t.set_mask(edge, keep)
            assert layer.num_parameters() == before - owned, (type(layer).__name__, edge)
            assert layer.num_parameters(effective=False) == sum(p.numel() for p in layer.parameters())
            assert t.ranks[edge] == t.max_ranks[edge] - 1
            t.set_mask(edge, torch.ones(t.max_ranks[edge], dtype=torch.bool))
            assert layer.num_parameters() == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_prune_shrinks_factors_and_keeps_the_masked_function(fmt):
    gen = torch.Generator().manual_seed(1)
    for layer in _layers(fmt):
        layer.double()
        t = layer.weight
        for edge in range(t.num_edges):
            keep = torch.rand(t.max_ranks[edge], generator=gen) < 0.5
            keep[torch.randint(t.max_ranks[edge], (1,), generator=gen)] = True
            t.set_mask(edge, keep)
        inputs = _inputs(layer)
        masked_out = layer(*inputs).detach()
        masked_dense = layer.dense_weight().detach()
        effective, ranks = layer.num_parameters(), layer.ranks
        kept = layer.prune()
        assert [len(k) for k in kept] == ranks
        assert layer.max_ranks == ranks and layer.ranks == ranks
        assert layer.num_parameters(effective=False) == effective == layer.num_parameters()
        assert sum(p.numel() for p in layer.parameters()) == effective
        for f, labels in enumerate(t.labels):  # every edge dimension physically shrank
            for d, lb in enumerate(labels):
                if lb[0] == "edge":
                    assert t.factors[f].shape[d] == ranks[lb[1]]
        assert all(m.dtype == torch.float64 and bool((m == 1).all()) for m in t.masks)
        close(layer(*inputs), masked_out)
        close(layer.dense_weight(), masked_dense)
        # the masked forward equals the dense computation too, and a pruned layer still trains
        layer(*inputs).sum().backward()
        assert all(p.grad is not None for p in t.factors)


@pytest.mark.parametrize("fmt", FORMATS)
def test_masked_forward_equals_masked_dense(fmt):
    layer = FactorizedLinear(784, 64, format=fmt, max_rank=6).double()
    for edge in range(layer.weight.num_edges):
        keep = torch.arange(layer.max_ranks[edge]) % 2 == 0
        layer.weight.set_mask(edge, keep)
    x = torch.randn(4, 784, dtype=torch.float64)
    close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


def test_set_mask_rejects_empty_and_wrong_size_masks():
    layer = FactorizedLinear(24, 36, format="tt", max_rank=4, in_shape=[2, 3, 4], out_shape=[3, 3, 4])
    with pytest.raises(ValueError, match="rank 0"):
        layer.weight.set_mask(1, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep"):
        layer.weight.set_mask(1, torch.ones(3, dtype=torch.bool))
    assert layer.ranks == layer.max_ranks


def test_rank_slice_members():
    """TT/TTM slice k = trailing dim of core k and leading dim of core k+1; Tucker: one factor column
    plus one core dim; CP: one column of every factor."""
    tt = build_tensor("tt", [3, 4], [5], 2)
    assert tt.edge_members(0) == [(0, 2), (1, 0)]
    assert tt.edge_members(1) == [(1, 2), (2, 0)]
    tucker = build_tensor("tucker", [3, 4], [5], 2)
    assert tucker.edge_members(1) == [(1, 1), (3, 1)]
    assert tucker.slice_members(1) == [(1, 1)]
    cp = build_tensor("cp", [3, 4], [5], 2)
    assert cp.edge_members(0) == [(0, 1), (1, 1), (2, 1)]


def test_contraction_cache_distinguishes_modes_with_equal_shapes():
    """A square tensor applied along different modes: equal operand shapes, different results."""
    t = build_tensor("tt", [4], [4], 3).double()
    w = t.full()
    x = torch.randn(2, 4, dtype=torch.float64)
    close(t.contract_modes(x, [1], [0]), x @ w.T)
    close(t.contract_modes(x, [0], [1]), x @ w)


def test_fold_gates_keeps_the_function():
    layer = FactorizedLinear(24, 36, format="tt", max_rank=4, in_shape=[2, 3, 4], out_shape=[3, 3, 4]).double()
    gates = [torch.rand(r, dtype=torch.float64) for r in layer.max_ranks]
    layer.weight.slice_gates = lambda edge: gates[edge]
    x = torch.randn(3, 24, dtype=torch.float64)
    gated = layer(x).detach()
    close(gated, F.linear(x, layer.dense_weight(), layer.bias))
    layer.weight.fold_gates()
    assert layer.weight.slice_gates is None
    close(layer(x), gated)


@pytest.mark.parametrize("fmt", FORMATS)
def test_copy_save_and_load_keep_the_function(fmt):
    layer = FactorizedLinear(24, 36, format=fmt, max_rank=3)
    x = torch.randn(2, 24)
    y = layer(x)
    close(copy.deepcopy(layer)(x), y, tol=1e-6)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    close(torch.load(buf, weights_only=False)(x), y, tol=1e-6)
    other = FactorizedLinear(24, 36, format=fmt, max_rank=3)
    other.load_state_dict(layer.state_dict())
    close(other(x), y, tol=1e-6)
    pruned = FactorizedLinear(**layer.config())  # rebuild at the current ranks
    assert pruned.max_ranks == layer.max_ranks


# ---- huge tables in little memory ------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from ranksearch.models.tensorized import FactorizedEmbeddingBag
    torch.set_num_threads(1)
    torch.manual_seed(0)
    def rss_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # warm the allocator and the kernels on a tiny table, so only the big table is measured
    small = FactorizedEmbeddingBag(1000, 8, format=sys.argv[1], max_rank=2)
    small(torch.tensor([1, 2]), torch.tensor([0])).sum().backward()
    before = rss_mib()
    bag = FactorizedEmbeddingBag(10**7, 128, format=sys.argv[1], max_rank=16)
    ids = torch.randint(0, 10**7, (4096,))
    ids[0], ids[1] = 0, 10**7 - 1
    out = bag(ids, torch.arange(0, 4096, 4))
    out.sum().backward()
    rows = bag.rows(ids[:2])
    assert out.shape == (1024, 128) and rows.shape == (2, 128) and bool(torch.isfinite(out).all())
    print(rss_mib() - before, bag.num_parameters())
    """
)


@pytest.mark.parametrize("fmt", ["tt", "ttm"])
def test_ten_million_row_table_in_little_memory(fmt):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, fmt], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    growth_mib, params = proc.stdout.split()
    assert float(growth_mib) < 1024, f"peak RSS grew by {growth_mib} MiB"
    assert int(params) < 10**7 * 128 / 1000  # > 1000x smaller than the dense table


# ---- argument checking -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,argument",
    [
        (lambda: FactorizedLinear(784, 512, format="tt", max_rank=4, in_shape=[4, 4, 7]), "in_shape"),
        (lambda: FactorizedLinear(784, 512, format="cp", max_rank=4, out_shape=[8, 8, 4]), "out_shape"),
        (lambda: FactorizedLinear(784, 512, format="tt", max_rank=4, in_shape=[4, 0, 49]), "in_shape"),
        (lambda: FactorizedLinear(784, 512, format="tt", max_rank=4, in_shape=784), "in_shape"),
        (lambda: FactorizedConv2d(16, 32, 3, format="tt", max_rank=4, in_shape=[3, 5]), "in_shape"),
        (lambda: FactorizedEmbeddingBag(1000, 16, format="tt", max_rank=4, shape=[[10, 10, 9], [4, 4]]), "shape"),
        (lambda: FactorizedEmbeddingBag(1000, 16, format="tt", max_rank=4, shape=[[10, 10, 10], [4, 3]]), "shape"),
        (lambda: FactorizedEmbeddingBag(1000, 16, format="tt", max_rank=4, shape=[1000, 16]), "shape"),
        (lambda: FactorizedEmbeddingBag(1000, 16, format="tt", max_rank=4, shape=[10, 10, 10]), "shape"),
        (lambda: FactorizedLinear(784, 512, format="tt", max_rank=0), "max_rank"),
        (lambda: FactorizedLinear(784, 512, format="cp", max_rank=-3), "max_rank"),
        (lambda: FactorizedLinear(784, 512, format="ttm", max_rank=2.5), "max_rank"),
        (lambda: FactorizedLinear(784, 512, format="tucker", max_rank="8"), "max_rank"),
        (lambda: FactorizedLinear(784, 512, format="tt", max_rank=True), "max_rank"),
        (lambda: FactorizedLinear(784, 512, format="tt", max_rank=None), "max_rank"),
        (lambda: FactorizedLinear(784, 512, format="ttm", max_rank=[4, 4]), "max_rank"),
        (lambda: FactorizedLinear(784, 512, format="ttm", max_rank=[4, 0, 4]), "max_rank"),
        (lambda: FactorizedConv2d(16, 32, 3, format="cp", max_rank=0), "max_rank"),
        (lambda: FactorizedEmbeddingBag(1000, 16, format="tt", max_rank=0), "max_rank"),
        (lambda: FactorizedLinear(784, 512, format="svd", max_rank=4), "format"),
        (lambda: FactorizedConv2d(16, 32, 3, format="TT", max_rank=4), "format"),
        (lambda: FactorizedEmbeddingBag(1000, 16, format="", max_rank=4), "format"),
        (lambda: FactorizedLinear(784, 512, format="ttm", max_rank=4, in_shape=[4, 4, 7, 7], out_shape=[8, 8, 8]),
         "in_shape"),
        (lambda: FactorizedConv2d(16, 32, 3, format="ttm", max_rank=4, in_shape=[4, 4], out_shape=[2, 4, 4]),
         "in_shape"),
        (lambda: FactorizedEmbeddingBag(1000, 16, format="ttm", max_rank=4, shape=[[10, 10, 10], [4, 4]]), "shape"),
        (lambda: FactorizedEmbeddingBag(1000, 16, format="tt", max_rank=4, mode="median"), "mode"),
        (lambda: FactorizedLinear(0, 512, format="tt", max_rank=4), "in_features"),
        (lambda: FactorizedLinear(784, 2.0, format="tt", max_rank=4), "out_features"),
        (lambda: FactorizedConv2d(16, 0, 3, format="tt", max_rank=4), "out_channels"),
        (lambda: FactorizedEmbeddingBag(0, 16, format="tt", max_rank=4), "num_embeddings"),
        (lambda: FactorizedEmbeddingBag(1000, -1, format="tt", max_rank=4), "embedding_dim"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_lookups_raise_value_error(fmt):
    bag = FactorizedEmbeddingBag(100, 8, format=fmt, max_rank=2, mode="mean")
    offsets = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="input"):
        bag(torch.tensor([1, 100]), offsets)
    with pytest.raises(ValueError, match="input"):
        bag(torch.tensor([-1, 3]), offsets)
    with pytest.raises(ValueError, match="input"):
        bag(torch.tensor([1.0, 3.0]), offsets)
    with pytest.raises(ValueError, match="per_sample_weights"):
        bag(torch.tensor([1, 3]), offsets, torch.ones(2))
    with pytest.raises(ValueError, match="offsets"):
        bag(torch.tensor([[1, 3]]), offsets)
    with pytest.raises(ValueError, match="input|offsets"):
        bag(torch.tensor([1, 3]))
    emb = FactorizedEmbedding(100, 8, format=fmt, max_rank=2)
    with pytest.raises(ValueError, match="input"):
        emb(torch.tensor([[0, 100]]))


# ---- initialization --------------------------------------------------------------------------


def _dense_std(build, seeds=6):
    """Root mean square over a few seeds (the factorized weights have heavy tails)."""
    var = 0.0
    for seed in range(seeds):
        torch.manual_seed(seed)
        var += float(build().dense_weight().detach().double().var())
    return math.sqrt(var / seeds)


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_matches_nn_linear_scale(fmt):
    target = 1 / math.sqrt(3 * 784)
    std = _dense_std(lambda: FactorizedLinear(784, 512, format=fmt, max_rank=16))
    assert abs(std / target - 1) < 0.25, std / target
    # and the dense reference really has that std
    assert abs(float(nn.Linear(784, 512).weight.detach().std()) / target - 1) < 0.02


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_matches_nn_conv2d_scale(fmt):
    target = 1 / math.sqrt(3 * 64 * 9)
    std = _dense_std(lambda: FactorizedConv2d(64, 128, 3, format=fmt, max_rank=16))
    assert abs(std / target - 1) < 0.25, std / target


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_embedding_rows_scale(fmt):
    n = 10**5
    target = 1 / math.sqrt(3 * n)  # DLRM / TT-Rec uniform(-1/sqrt(n), 1/sqrt(n))
    var = 0.0
    for seed in range(6):
        torch.manual_seed(seed)
        bag = FactorizedEmbeddingBag(n, 32, format=fmt, max_rank=16)
        with torch.no_grad():
            var += float(bag.rows(torch.randint(0, n, (4000,))).double().var())
    assert abs(math.sqrt(var / 6) / target - 1) < 0.25


# ---- FLOPs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_flops_are_positive_ints(fmt):
    for layer in _layers(fmt):
        for batch in (1, 64):
            flops = layer.flops(batch)
            assert isinstance(flops, int) and flops > 0
        assert layer.flops(64) > layer.flops(1) or isinstance(layer, FactorizedConv2d)


def test_ttm_rank_one_is_cheaper_than_dense():
    for batch in (1, 256):
        layer = FactorizedLinear(784, 512, format="ttm", max_rank=1)
        assert layer.flops(batch) < batch * 784 * 512
        big = FactorizedLinear(4096, 4096, format="ttm", max_rank=1)
        assert big.flops(batch) < batch * 4096 * 4096
    bag = FactorizedEmbeddingBag(10**6, 128, format="ttm", max_rank=1)
    assert bag.flops(4096) < 4096 * 128 * 16


@pytest.mark.parametrize("fmt", FORMATS)
def test_flops_drop_after_pruning(fmt):
    layer = FactorizedLinear(784, 512, format=fmt, max_rank=16)
    before = layer.flops(256)
    for edge in range(layer.weight.num_edges):
        keep = torch.zeros(layer.max_ranks[edge], dtype=torch.bool)
        keep[:2] = True
        layer.weight.set_mask(edge, keep)
    layer.prune()
    assert layer.flops(256) < before


# ---- CUDA (run where a GPU is present) -------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_matches_cpu(fmt):
    """Every layer on the GPU computes what it computes on the CPU, gradients included, and
    masks, pruning and lookups stay on the device."""
    dev = torch.device("cuda")
    for layer in _layers(fmt):
        layer.double()
        inputs = _inputs(layer)
        gpu = copy.deepcopy(layer).to(dev)
        gpu_inputs = [x.to(dev) for x in inputs]
        y_cpu, y_gpu = layer(*inputs), gpu(*gpu_inputs)
        close(y_gpu.cpu(), y_cpu)
        y_cpu.square().sum().backward()
        y_gpu.square().sum().backward()
        for p_cpu, p_gpu in zip(layer.parameters(), gpu.parameters()):
            close(p_gpu.grad.cpu(), p_cpu.grad)
        t = gpu.weight
        for edge in range(t.num_edges):
            keep = torch.arange(t.max_ranks[edge], device=dev) % 2 == 0
            t.set_mask(edge, keep)
            layer.weight.set_mask(edge, keep.cpu())
        gpu.prune()
        assert all(m.device.type == "cuda" for m in t.masks) and all(p.is_cuda for p in gpu.parameters())
        close(gpu(*gpu_inputs).detach().cpu(), layer(*inputs).detach())
    bag = FactorizedEmbeddingBag(1000, 16, format=fmt, max_rank=4, mode="sum").double()
    gbag = copy.deepcopy(bag).to(dev)
    ids, offsets, psw = torch.randint(0, 1000, (40,)), torch.tensor([0, 5, 5, 20]), torch.rand(40).double()
    close(gbag(ids.to(dev), offsets.to(dev), psw.to(dev)).cpu(), bag(ids, offsets, psw))
    emb = FactorizedEmbedding(1000, 16, format=fmt, max_rank=4).double()
    close(copy.deepcopy(emb).to(dev)(ids.view(4, 10).to(dev)).cpu(), emb(ids.view(4, 10)))


@cuda
@pytest.mark.parametrize("fmt", ["tt", "ttm"])
def test_cuda_ten_million_row_table_in_little_memory(fmt):
    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    bag = FactorizedEmbeddingBag(10**7, 128, format=fmt, max_rank=16).to(dev)
    ids = torch.randint(0, 10**7, (4096,), device=dev)
    bag(ids, torch.arange(0, 4096, 4, device=dev)).sum().backward()
    assert torch.cuda.max_memory_allocated(dev) - base < 2**30


def test_tucker_lookup_contracts_in_a_cheap_order():
    """Row lookups of a Tucker table: core with one factor at a time (~r^4 per row), never the
    (rows, r, r, r) outer product of the row factors times the core (~r^3 * dim per row)."""
    bag = FactorizedEmbeddingBag(10**6, 128, format="tucker", max_rank=16)
    r = 16
    sequential = r**4 + r**3 + r**2 + 128 * r
    assert bag.flops(4096) <= 1.1 * 4096 * sequential


def test_lookup_paths_are_reused_across_batch_sizes():
    bag = FactorizedEmbeddingBag(10**4, 16, format="tt", max_rank=4)
    for n in (100, 101, 117, 128):  # one power-of-two bucket: one path search
        bag.rows(torch.arange(n))
    paths = [k for k in bag.weight._expressions if k[0] == "path"]
    assert len(paths) == 1
    bag.rows(torch.arange(129))
    assert len([k for k in bag.weight._expressions if k[0] == "path"]) == 2
