"""The fused TT/TTM lookup equals the generic einsum path: forward and every gradient (cores,
per-sample weights, gates, sampler), for tt and ttm, 2/3/4 row cores, every pooling mode,
repeated and empty bags, masks; and its prefix tree is what it says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ranksearch.models.tensorized import FactorizedEmbeddingBag, tt_kernel
from ranksearch.models.tensorized.tt_lookup import PrefixTree, Tail, distinct_ids

from torch_fixtures import _one_thread, _seed  # noqa: F401  (autouse fixtures)

@pytest.fixture(autouse=True, params=["compiled", "torch"])
def backend(request, monkeypatch):
    """Every test on both backends of the fused path: the C++ kernel and the pure-PyTorch one."""
    if request.param == "torch":
        monkeypatch.setitem(tt_kernel._state, "module", None)
    elif tt_kernel.kernel() is None:
        pytest.skip("the fused TT kernel could not be built here")
    return request.param


SHAPES = {  # rows, dim, [row factors, dim factors]: 2, 3 and 4 cores, padded rows and columns
    2: (37, 9, [[5, 8], [2, 5]]),
    3: (60, 10, [[3, 4, 5], [2, 2, 3]]),
    4: (45, 10, [[2, 3, 2, 4], [1, 2, 2, 3]]),
}
BAGS = (  # repeated ids, empty bags (first, middle, last), one id in a bag
    torch.tensor([3, 3, 3, 36, 0, 7, 7, 12, 1, 2, 33, 5, 5, 0]),
    torch.tensor([0, 0, 4, 4, 9, 10, 14]),
)


def _bag(fmt, cores, mode="sum", rank=3):
    rows, dim, shape = SHAPES[cores]
    return FactorizedEmbeddingBag(rows, dim, format=fmt, max_rank=rank, mode=mode, shape=shape).double()


def _run(bag, fused, ids, offsets, psw=None, extra=()):
    """Output and gradients of (output * fixed weights).sum() with respect to the cores and `extra`."""
    bag.fused = fused
    leaves = list(bag.parameters()) + list(extra)
    out = bag(ids, offsets, psw)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    return out.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]


def _assert_same(a, b, tol=1e-10):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert out_a.shape == out_b.shape
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt", ["tt", "ttm"])
@pytest.mark.parametrize("cores", [2, 3, 4])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_forward_and_core_grads_equal_the_einsum_path(fmt, cores, mode):
    bag = _bag(fmt, cores, mode)
    ids, offsets = BAGS
    ids = ids % bag.num_embeddings
    _assert_same(_run(bag, True, ids, offsets), _run(bag, False, ids, offsets))
    ids2 = torch.randint(0, bag.num_embeddings, (6, 5))  # 2-D: bags of equal length
    _assert_same(_run(bag, True, ids2, None), _run(bag, False, ids2, None))


@pytest.mark.parametrize("fmt", ["tt", "ttm"])
@pytest.mark.parametrize("cores", [2, 3, 4])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_one_id_bags_write_rows_per_lookup(fmt, cores, mode):
    """Bags of one id each (DLRM's features): the lookup writes every bag's row itself and sums a
    repeated id's gradients; equal to the einsum path with its pooling, with and without a last offset.
    Mostly repeated ids take tt's tail per distinct id (TAIL_PER_ID_BELOW), mostly distinct ones not."""
    repeated = torch.cat([BAGS[0], BAGS[0][:5]]) % SHAPES[cores][0]  # ids looked up up to 4 times
    distinct = torch.randperm(SHAPES[cores][0])[:20]
    distinct[-1] = distinct[0]
    bag = _bag(fmt, cores, mode)
    for ids in (repeated, distinct):
        for offsets in (torch.arange(ids.numel()), torch.arange(ids.numel() + 1)):
            bag.include_last_offset = offsets.numel() > ids.numel()
            _assert_same(_run(bag, True, ids, offsets), _run(bag, False, ids, offsets))
            _assert_same(_run(bag, True, ids.int(), offsets), _run(bag, False, ids, offsets))


@pytest.mark.parametrize("fmt", ["tt", "ttm"])
@pytest.mark.parametrize("cores", [2, 3, 4])
def test_per_sample_weight_grads_equal_the_einsum_path(fmt, cores):
    bag = _bag(fmt, cores)
    ids, offsets = BAGS
    ids = ids % bag.num_embeddings
    psw = torch.rand(len(ids), dtype=torch.float64, requires_grad=True)
    _assert_same(_run(bag, True, ids, offsets, psw, [psw]), _run(bag, False, ids, offsets, psw, [psw]))


@pytest.mark.parametrize("fmt", ["tt", "ttm"])
def test_float32_matches_the_einsum_path(fmt):
    bag = FactorizedEmbeddingBag(10**5, 16, format=fmt, max_rank=8)
    ids = torch.randint(0, 10**5, (3000,))
    ids[:1000] = ids[1000:2000]  # many repeats, shared prefixes
    offsets = torch.arange(0, 3000, 3)
    _assert_same(_run(bag, True, ids, offsets), _run(bag, False, ids, offsets), tol=1e-4)


@pytest.mark.parametrize("fmt", ["tt", "ttm"])
def test_masks_gates_and_sampler_keep_working(fmt):
    bag = _bag(fmt, 3, rank=4)
    ids, offsets = BAGS
    ids = ids % bag.num_embeddings
    bag.weight.set_mask(1, torch.arange(bag.max_ranks[1]) != 1)
    gates = [torch.rand(r, dtype=torch.float64, requires_grad=True) for r in bag.max_ranks]
    bag.weight.slice_gates = lambda edge: gates[edge]
    _assert_same(_run(bag, True, ids, offsets, extra=gates), _run(bag, False, ids, offsets, extra=gates))
    bag.weight.slice_gates = None
    noise = [torch.randn_like(f) for f in bag.weight.factors]
    bag.weight.factor_sampler = lambda factors: [f + 0.1 * n for f, n in zip(factors, noise)]
    bag.train()
    sampled = _run(bag, True, ids, offsets)
    _assert_same(sampled, _run(bag, False, ids, offsets))
    bag.eval()  # the sampler only acts in training
    assert not torch.allclose(_run(bag, True, ids, offsets)[0], sampled[0])


@pytest.mark.parametrize("fmt", ["tt", "ttm"])
def test_no_ids_and_all_bags_empty(fmt):
    bag = _bag(fmt, 3)
    empty = torch.zeros(0, dtype=torch.long)
    out, grads = _run(bag, True, empty, torch.tensor([0, 0, 0]))
    assert out.shape == (3, bag.embedding_dim) and not out.any()
    assert all(not g.any() for g in grads)
    assert bag.lookup(empty).shape == (0, bag.embedding_dim)


@pytest.mark.parametrize("fmt", ["tt", "ttm"])
def test_lookup_and_gradcheck(fmt):
    bag = _bag(fmt, 3, rank=2)
    ids = torch.tensor([[5, 5, 59], [0, 12, 13]])
    torch.testing.assert_close(bag.lookup(ids), bag.dense_weight()[ids], rtol=1e-10, atol=1e-10)
    params = [p.detach().clone().requires_grad_() for p in bag.parameters()]
    names = [n for n, _ in bag.named_parameters()]
    f = lambda *ps: torch.func.functional_call(bag, dict(zip(names, ps)), (ids,))  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(params), eps=1e-6, atol=1e-6)


def test_prefix_tree_levels():
    ids = torch.tensor([0, 1, 5, 6, 29])  # row shape [2, 3, 5]: digits (0,0,0) (0,0,1) (0,1,0) (0,1,1) (1,2,4)
    tree = PrefixTree.of(ids, [2, 3, 5])
    assert tree.sizes == [2, 3, 5]
    assert tree.digits[0].tolist() == [0, 1]
    assert tree.digits[1].tolist() == [0, 1, 2] and tree.parents[1].tolist() == [0, 0, 1]
    assert tree.digits[2].tolist() == [0, 1, 0, 1, 4] and tree.parents[2].tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("rows, shape, n", [
    (30, [2, 3, 5], 200),  # few ids: the comparison sort
    (10**6, [100, 100, 100], 3000),  # radix sort, two passes
    (10**7, [200, 200, 250], 3000),  # three passes
    (10**6, [1000, 1000], 0),  # no ids
    (4096, [4, 4, 4, 4, 4, 4], 2000),  # six levels
])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_distinct_ids_and_tree_equal_torch_unique(rows, shape, n, dtype):
    """The kernel's sort + tree in one pass against torch.unique + PrefixTree.of (either backend)."""
    ids = torch.randint(0, rows, (n,), dtype=dtype)
    ids[: n // 3] = ids[n // 3 : 2 * (n // 3)]  # repeats
    unique, inverse, tree = distinct_ids(ids, shape)
    want_unique, want_inverse = torch.unique(ids, return_inverse=True)
    assert unique.dtype == ids.dtype and torch.equal(unique, want_unique) and torch.equal(inverse, want_inverse)
    want = PrefixTree.of(want_unique, shape)
    tree = tree or PrefixTree.of(unique, shape)  # the PyTorch backend builds it later
    assert tree.sizes == want.sizes
    assert all(torch.equal(a, b) for a, b in zip(tree.digits, want.digits))
    assert all(torch.equal(a, b) for a, b in zip(tree.parents[1:], want.parents[1:]))


@pytest.mark.parametrize("rows, rank, dims, width", [(1, 1, [1], 1), (37, 5, [2, 7], 13), (300, 16, [4, 4, 8], 128),
                                                     (2000, 16, [2, 5], 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tail_gradients_equal_autograds(backend, rows, rank, dims, width, dtype):
    """A tt tail's own forward and hand-written backward: one pass over the output gradient
    (blocks, a ragged last block), padded columns cut, the chain of column cores."""
    ranks = [rank] + [3] * (len(dims) - 1) + [1]
    cores = [torch.randn(ranks[j], d, ranks[j + 1], dtype=dtype, requires_grad=True) for j, d in enumerate(dims)]
    x = torch.randn(rows, rank, dtype=dtype, requires_grad=True)
    g = torch.randn(rows, width, dtype=dtype)
    out = Tail(cores)(x, width)
    got = torch.autograd.grad((out * g).sum(), [x, *cores])
    full = cores[0]
    for core in cores[1:]:
        full = torch.einsum("a...r,rds->a...ds", full, core)
    want_out = x @ full.reshape(rank, -1)[:, :width]
    want = torch.autograd.grad((want_out * g).sum(), [x, *cores])
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    for a, b in zip([out, *got], [want_out, *want]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("distinct, lookups", [(1, 1), (5, 40), (70, 70), (300, 1000)])
def test_tail_rows_per_lookup(backend, distinct, lookups):
    """The kernel's tail from distinct rows straight to each lookup's row (repeats multiplied once,
    their gradients summed first) equals (rows @ tail)[inverse] under autograd."""
    if backend == "torch":
        pytest.skip("rows per lookup are the compiled kernel's")
    cores = [torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 5, 1, dtype=torch.float64, requires_grad=True)]
    rows = torch.randn(distinct, 6, dtype=torch.float64, requires_grad=True)
    inverse = torch.cat([torch.arange(distinct), torch.randint(0, distinct, (lookups - distinct,))])
    inverse = inverse[torch.randperm(lookups)]
    tree = PrefixTree([], [], [distinct])
    tree.group_lookups(inverse)
    g = torch.randn(lookups, 19, dtype=torch.float64)
    out = Tail(cores, lookups=(tree.order, tree.bounds))(rows, 19)
    got = torch.autograd.grad((out * g).sum(), [rows, *cores])
    want_out = (rows @ torch.einsum("adr,res->ades", *cores).reshape(6, -1)[:, :19])[inverse]
    want = torch.autograd.grad((want_out * g).sum(), [rows, *cores])
    for a, b in zip([out, *got], [want_out, *want]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", ["tt", "ttm"])
@pytest.mark.parametrize("threads", [1, 2])
def test_rank16_dim128_float32_matches_the_einsum_path(fmt, threads):
    """The kernel's vector tiles at the shapes of real tables (rank 16, dim factors 4x4x8)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bag = FactorizedEmbeddingBag(10**6, 128, format=fmt, max_rank=16)
        ids = torch.randint(0, 10**6, (1500,))
        ids[:300] = torch.randint(0, 2000, (300,))  # shared prefixes
        offsets = torch.arange(0, 1500, 3)
        _assert_same(_run(bag, True, ids, offsets), _run(bag, False, ids, offsets), tol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_compiled_kernel_with_two_threads_equals_the_einsum_path(backend):
    """The kernel's digit groups and parent ranges under OpenMP."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bag = FactorizedEmbeddingBag(10**4, 16, format="ttm", max_rank=4).double()
        ids = torch.randint(0, 10**4, (2000,))
        _assert_same(_run(bag, True, ids, torch.arange(0, 2000, 4)), _run(bag, False, ids, torch.arange(0, 2000, 4)))
    finally:
        torch.set_num_threads(threads)


def test_no_per_lookup_copies_in_the_graph():
    """One autograd node for the whole table lookup, whatever the batch size."""
    bag = FactorizedEmbeddingBag(10**4, 16, format="ttm", max_rank=4)
    out = bag(torch.randint(0, 10**4, (500,)), torch.arange(0, 500, 5))
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [n for n, _ in node.next_functions]
    names = [type(n).__name__ for n in seen]
    assert sum("FusedLookup" in n for n in names) == 1
    assert not any("IndexSelect" in n or "Bmm" in n for n in names), names
    assert isinstance(bag.weight.factors[0], nn.Parameter)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["tt", "ttm"])
def test_cuda_fused_lookup_and_table_step_match_cpu(fmt, backend):
    """On a GPU the fused path runs as batched PyTorch GEMMs (the C++ kernel is CPU only)."""
    from ranksearch.models.tensorized.table_optim import make_table_optimizer

    cpu = FactorizedEmbeddingBag(10**4, 16, format=fmt, max_rank=4)
    gpu = FactorizedEmbeddingBag(10**4, 16, format=fmt, max_rank=4).cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids, offsets = torch.randint(0, 10**4, (600,)), torch.arange(0, 600, 3)
    out_c, grads_c = _run(cpu, True, ids, offsets)
    out_g, grads_g = _run(gpu, True, ids.cuda(), offsets.cuda())
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_g, grads_c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
    for bag, dev in ((cpu, "cpu"), (gpu, "cuda")):
        make_table_optimizer("rowwise_adagrad", 0.1).attach(bag)
        bag(ids.to(dev), offsets.to(dev)).sum().backward()
    for a, b in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-4, atol=1e-5)
