"""Fused sparse table optimizers: a step inside backward equals the same rule applied densely to
reference gradients (einsum path, autograd), for fused TT/TTM cores, hook-updated cores (gates,
cp, tucker) and plain sparse bags; Adam equals torch.optim.SparseAdam."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ranksearch.models.tensorized import FactorizedEmbeddingBag
from ranksearch.models.tensorized.table_optim import TABLE_OPTIMIZERS, make_table_optimizer

from torch_fixtures import _one_thread, _seed  # noqa: F401  (autouse fixtures)

LR = 0.05


def _slice_dim(labels):
    dims = [d for d, lb in enumerate(labels) if lb[0] == "mode"]
    return dims[0] if dims and len(dims) < len(labels) else None


class Reference:
    """The rule applied densely: every slice, with the gradients autograd gives the einsum path."""

    def __init__(self, name, params_dims):
        self.name, self.params_dims = name, params_dims
        self.state = [{} for _ in params_dims]
        self.adams = {}

    @torch.no_grad()
    def step(self):
        for (p, dim), st in zip(self.params_dims, self.state):
            g = p.grad
            if g is None:
                continue
            if dim is None:
                p_, g_, d = p.unsqueeze(0), g.unsqueeze(0), 0
            else:
                p_, g_, d = p, g, dim
            if self.name == "sgd":
                p_ -= LR * g_
            elif self.name == "rowwise_adagrad":
                other = [i for i in range(g_.dim()) if i != d]
                st.setdefault("sum", torch.zeros(g_.shape[d], dtype=torch.float64))
                st["sum"] += g_.pow(2).mean(dim=other)
                view = [1] * g_.dim()
                view[d] = -1
                p_ -= LR * g_ / (st["sum"].sqrt() + 1e-8).view(view)
            else:  # adam: torch's own SparseAdam over the slices with a gradient
                key = id(p)
                if key not in self.adams:
                    shadow = nn.Parameter(p_.detach().movedim(d, 0).clone())
                    self.adams[key] = (shadow, torch.optim.SparseAdam([shadow], lr=LR, eps=1e-8))
                shadow, opt = self.adams[key]
                gm = g_.movedim(d, 0)
                rows = torch.nonzero(gm.reshape(gm.shape[0], -1).abs().amax(1)).flatten()
                shadow.grad = torch.sparse_coo_tensor(rows[None], gm[rows], gm.shape, check_invariants=True)
                opt.step()
                p_.copy_(shadow.detach().movedim(0, d))
            p.grad = None


def _batches(n, steps=4):
    """Bags of several ids and, every other step, bags of one id each (the per-lookup fused path)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        ids = torch.randint(0, n, (30,), generator=g)
        ids[:10] = ids[10:20]  # repeats
        out.append((ids, torch.arange(30) if step % 2 else torch.tensor([0, 4, 4, 17, 30 - 1])))
    return out


def _loss(out):
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()


def _check(fused_model, ref_model, params_dims, name, batches, forward):
    table = make_table_optimizer(name, LR).attach(fused_model)
    ref = Reference(name, params_dims)
    for batch in batches:
        _loss(forward(fused_model, batch)).backward()
        assert all(p.grad is None for p in fused_model.parameters())  # the dense optimizer sees nothing
        _loss(forward(ref_model, batch)).backward()
        ref.step()
        for a, b in zip(fused_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    table.detach()
    _loss(forward(fused_model, batches[0])).backward()  # detached: gradients reach .grad again
    assert all(p.grad is not None for p in fused_model.parameters())


CASES = {
    "ttm": dict(format="ttm"),
    "tt": dict(format="tt"),  # fused row cores, column cores updated in the tail's backward
    "ttm-gated": dict(format="ttm", gated=True),  # cores changed by gates: dense gradients, hooks
    "cp": dict(format="cp"),
    "tucker": dict(format="tucker"),
}


@pytest.mark.parametrize("name", sorted(TABLE_OPTIMIZERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_step_equals_the_dense_reference(name, case):
    opts = CASES[case]
    bag = FactorizedEmbeddingBag(60, 10, format=opts["format"], max_rank=3, shape=[[3, 4, 5], [2, 2, 3]]).double()
    ref = copy.deepcopy(bag)
    ref.fused = False
    if opts.get("gated"):
        gates = [torch.rand(r, dtype=torch.float64) + 0.5 for r in bag.max_ranks]
        bag.weight.slice_gates = ref.weight.slice_gates = lambda edge: gates[edge]
    dims = [(p, _slice_dim(lb)) for p, lb in zip(ref.weight.factors, ref.weight.labels)]
    _check(bag, ref, dims, name, _batches(60), lambda m, b: m(*b))


@pytest.mark.parametrize("name", sorted(TABLE_OPTIMIZERS))
@pytest.mark.parametrize("fmt", ["tt", "ttm"])
def test_a_table_looked_up_twice_in_one_graph(name, fmt):
    """Both lookups' gradients are taken at the forward's values and the table gets one update
    from their sum, as the dense reference does (updating after the first backward node would
    make the second use changed cores)."""
    bag = FactorizedEmbeddingBag(60, 10, format=fmt, max_rank=3, shape=[[3, 4, 5], [2, 2, 3]]).double()
    ref = copy.deepcopy(bag)
    ref.fused = False
    dims = [(p, _slice_dim(lb)) for p, lb in zip(ref.weight.factors, ref.weight.labels)]

    def twice(model, batch):
        ids, offsets = batch
        return torch.cat([model(ids, offsets), 2 * model(ids.flip(0), offsets)])

    _check(bag, ref, dims, name, _batches(60), twice)


@pytest.mark.parametrize("name", sorted(TABLE_OPTIMIZERS))
def test_plain_sparse_bag(name):
    bag = nn.EmbeddingBag(50, 6, mode="sum", sparse=True).double()
    ref = copy.deepcopy(bag)
    ref.sparse = False
    bag.sparse = False  # attach makes it sparse for the duration
    _check(bag, ref, [(ref.weight, 0)], name, _batches(50), lambda m, b: m(*b))
    assert bag.sparse is False


def test_only_touched_slices_change():
    bag = FactorizedEmbeddingBag(1000, 8, format="ttm", max_rank=4, shape=[[10, 10, 10], [2, 2, 2]])
    before = [f.detach().clone() for f in bag.weight.factors]
    make_table_optimizer("rowwise_adagrad", 0.1).attach(bag)
    bag(torch.tensor([123, 129]), torch.tensor([0])).sum().backward()  # digits (1,2,3) and (1,2,9)
    changed = [torch.nonzero((f.detach() - b).abs().amax(dim=(0, 2, 3))).flatten().tolist()
               for f, b in zip(bag.weight.factors, before)]
    assert changed == [[1], [2], [3, 9]]


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="table_optimizer: unknown 'adagrad'"):
        make_table_optimizer("adagrad", 0.1)
    with pytest.raises(ValueError, match="table_lr"):
        make_table_optimizer("sgd", 0.0)


def test_train_config_names_a_bad_table_optimizer():
    from ranksearch.models.train import _check_train_config

    assert _check_train_config({})["table_optimizer"] == "auto"
    with pytest.raises(ValueError, match="train.table_optimizer: expected one of auto, none, "):
        _check_train_config({"table_optimizer": "adagrad"})
