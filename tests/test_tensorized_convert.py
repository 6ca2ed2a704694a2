"""from_dense (TT-SVD, HOSVD, CP-ALS) and tensorize (replace the layers of a model in place)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ranksearch.models.tensorized import (
    FORMATS,
    FactorizedConv2d,
    FactorizedEmbedding,
    FactorizedEmbeddingBag,
    FactorizedLayer,
    FactorizedLinear,
    factorized_layers,
    from_dense,
    tensorize,
)


from torch_fixtures import _one_thread, _seed  # noqa: F401  (autouse fixtures)


def rel_err(a, b) -> float:
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


# shapes with exactly low-rank weights: built from a random factorized layer at the true rank
LINEAR_SHAPES = dict(in_shape=[2, 3, 4], out_shape=[3, 3, 4])
TRUE_RANK = {"cp": 3, "tucker": 2, "tt": 3, "ttm": 3}


def _low_rank_linear(fmt, rank) -> nn.Linear:
    src = FactorizedLinear(24, 36, format=fmt, max_rank=rank, **LINEAR_SHAPES)
    dense = nn.Linear(24, 36)
    with torch.no_grad():
        dense.weight.copy_(src.dense_weight())
    return dense


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_dense_recovers_an_exactly_low_rank_linear(fmt):
    r = TRUE_RANK[fmt]
    dense = _low_rank_linear(fmt, r)
    for rank in (r, r + 2):  # the true rank, and a larger one (extra slices padded with zeros)
        if fmt == "cp" and rank != r:
            continue  # CP-ALS above the true rank is ill-posed (degenerate components)
        new = from_dense(dense, fmt, rank, **LINEAR_SHAPES)
        assert isinstance(new, FactorizedLinear) and new.format == fmt
        assert rel_err(new.dense_weight(), dense.weight) < 1e-5, (rank, rel_err(new.dense_weight(), dense.weight))
        torch.testing.assert_close(new.bias, dense.bias)
        x = torch.randn(5, 24)
        torch.testing.assert_close(new(x), dense(x), atol=1e-5, rtol=1e-4)


def test_from_dense_recovers_a_low_rank_conv_and_table():
    conv_src = FactorizedConv2d(4, 8, 3, format="tt", max_rank=2, stride=2, padding=1)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(conv_src.dense_weight())
    for fmt in ("tt", "ttm"):
        new = from_dense(conv, fmt, 8, in_shape=[2, 2], out_shape=[2, 4])
        assert isinstance(new, FactorizedConv2d) and new.stride == conv.stride and new.padding == conv.padding
        assert rel_err(new.dense_weight(), conv.weight) < 1e-5
        x = torch.randn(2, 4, 7, 7)
        torch.testing.assert_close(new(x), conv(x), atol=1e-5, rtol=1e-4)

    table_src = FactorizedEmbeddingBag(60, 8, format="ttm", max_rank=2, shape=[[3, 4, 5], [2, 2, 2]])
    bag = nn.EmbeddingBag(60, 8, mode="max", include_last_offset=True)
    with torch.no_grad():
        bag.weight.copy_(table_src.dense_weight())
    new = from_dense(bag, "ttm", 2, shape=[[3, 4, 5], [2, 2, 2]])
    assert isinstance(new, FactorizedEmbeddingBag) and new.mode == "max" and new.include_last_offset
    assert rel_err(new.dense_weight(), bag.weight) < 1e-5
    ids, offsets = torch.tensor([0, 59, 7, 7, 30]), torch.tensor([0, 2, 5])
    torch.testing.assert_close(new(ids, offsets), bag(ids, offsets), atol=1e-5, rtol=1e-4)

    emb = nn.Embedding(60, 8)
    with torch.no_grad():
        emb.weight.copy_(table_src.dense_weight())
    new = from_dense(emb, "tt", 8, shape=[[3, 4, 5], [2, 2, 2]])  # TT rank across rows|cols <= 8
    assert isinstance(new, FactorizedEmbedding)
    ids = torch.tensor([[0, 59], [7, 31]])
    torch.testing.assert_close(new(ids), emb(ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_dense_error_decreases_with_rank(fmt):
    dense = nn.Linear(64, 48)
    shapes = dict(in_shape=[4, 4, 4], out_shape=[4, 3, 4])
    ranks = [1, 2, 4, 8, 16]
    errors = [rel_err(from_dense(dense, fmt, r, **shapes).dense_weight(), dense.weight) for r in ranks]
    for lower, higher in zip(errors, errors[1:]):
        assert higher <= lower + 1e-3, errors
    assert errors[-1] < errors[0] - 0.1, errors
    if fmt in ("tt", "ttm", "tucker"):  # at full rank the truncated SVDs are exact
        full = from_dense(dense, fmt, 64, **shapes)
        assert rel_err(full.dense_weight(), dense.weight) < 1e-5


def test_from_dense_with_padded_shapes():
    """Sizes that factor badly: the padded dense tensor is decomposed, padding stays invisible."""
    dense = nn.Linear(13, 11)
    new = from_dense(dense, "tt", 100, in_shape=[4, 4], out_shape=[3, 4])
    assert rel_err(new.dense_weight(), dense.weight) < 1e-5
    x = torch.randn(3, 13)
    torch.testing.assert_close(new(x), dense(x), atol=1e-5, rtol=1e-4)


def test_from_dense_rejects_unsupported_layers():
    with pytest.raises(ValueError, match="layer"):
        from_dense(nn.LSTM(4, 4), "tt", 2)
    with pytest.raises(ValueError, match="layer"):
        from_dense(nn.Conv2d(4, 8, 3, groups=2), "tt", 2)
    with pytest.raises(ValueError, match="format"):
        from_dense(nn.Linear(8, 8), "svd", 2)
    with pytest.raises(ValueError, match="max_rank"):
        from_dense(nn.Linear(8, 8), "tt", 0)


# ---- tensorize ------------------------------------------------------------------------------


class Small(nn.Module):
    """Conv + Linear + Embedding + EmbeddingBag + a tiny head below min_params."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)  # 432 weights
        self.body = nn.Sequential(nn.Linear(16 * 4 * 4, 64), nn.ReLU())  # 16384
        self.emb = nn.Embedding(1000, 16)  # 16000
        self.bag = nn.EmbeddingBag(500, 16, mode="sum")  # 8000
        self.head = nn.Linear(64 + 32, 2)  # 192: below min_params
        self.norm = nn.LayerNorm(64)

    def forward(self, image, ids, bag_ids, offsets):
        h = F.adaptive_avg_pool2d(F.relu(self.conv(image)), 4).flatten(1)
        h = self.norm(self.body(h))
        e = self.emb(ids).mean(1)
        b = self.bag(bag_ids, offsets)
        return self.head(torch.cat([h, e, b], 1))


def _batch(n=8):
    return (
        torch.randn(n, 3, 8, 8),
        torch.randint(0, 1000, (n, 3)),
        torch.randint(0, 500, (3 * n,)),
        torch.arange(0, 3 * n, 3),
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensorize_replaces_the_right_layers(fmt):
    model = Small()
    report = tensorize(model, format=fmt, max_rank=4, min_params=256)
    assert isinstance(model.conv, FactorizedConv2d)
    assert isinstance(model.body[0], FactorizedLinear)
    assert type(model.emb) is FactorizedEmbedding
    assert type(model.bag) is FactorizedEmbeddingBag
    assert type(model.head) is nn.Linear  # below min_params
    assert isinstance(model.norm, nn.LayerNorm)
    assert [row["layer"] for row in report] == ["conv", "body.0", "emb", "bag"]
    assert set(factorized_layers(model)) == {"conv", "body.0", "emb", "bag"}
    for row in report:
        layer = model.get_submodule(row["layer"])
        assert row["format"] == fmt
        assert row["ranks"] == layer.ranks and row["max_ranks"] == layer.max_ranks
        assert row["params"] == layer.num_parameters()
        assert row["kind"] in ("conv2d", "linear", "embedding", "embedding_bag")
    assert [r["dense_params"] for r in report] == [432 + 16, 16384 + 64, 16000, 8000]
    assert [r["shape"] for r in report] == [[16, 3, 3, 3], [64, 256], [1000, 16], [500, 16]]
    out = model(*_batch())
    assert out.shape == (8, 2) and bool(torch.isfinite(out).all())


def test_tensorize_include_and_exclude_patterns():
    model = Small()
    report = tensorize(model, format="tt", max_rank=4, min_params=0, include=["body.*", "head"])
    assert [r["layer"] for r in report] == ["body.0", "head"]
    assert type(model.conv) is nn.Conv2d and type(model.emb) is nn.Embedding

    model = Small()
    report = tensorize(model, format="tt", max_rank=4, min_params=0, exclude=["*emb*", "bag", "conv"])
    assert [r["layer"] for r in report] == ["body.0", "head"]

    model = Small()
    report = tensorize(model, format="ttm", max_rank=4, min_params=256, include=["*"], exclude=["body.0"])
    assert [r["layer"] for r in report] == ["conv", "emb", "bag"]

    model = Small()
    assert tensorize(model, format="cp", max_rank=4, include=["nothing*"]) == []
    assert not factorized_layers(model)


def test_tensorize_on_a_bare_layer_and_already_factorized_models():
    model = Small()
    tensorize(model, format="tt", max_rank=4, min_params=256)
    assert tensorize(model, format="tt", max_rank=4, min_params=0) == [
        {"layer": "head", **model.head.describe()}
    ]  # only the remaining dense layer; factorized ones are left alone


def test_tensorize_keeps_dtype_and_the_models_weight_scale():
    model = Small().double()
    with torch.no_grad():
        model.body[0].weight.mul_(10.0)  # a custom init scale the factorized layer should keep
    scale = float(model.body[0].weight.detach().std())
    bias = model.body[0].bias.detach().clone()
    tensorize(model, format="ttm", max_rank=8, min_params=256)
    layer = model.body[0]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(m.dtype == torch.float64 for m in layer.rank_masks)
    torch.testing.assert_close(layer.bias, bias)
    ratio = float(layer.dense_weight().detach().std()) / scale
    assert 0.5 < ratio < 2.0, ratio
    model(*[t.double() if t.is_floating_point() else t for t in _batch()])


@pytest.mark.parametrize("fmt", ["tt", "ttm", "tucker"])
def test_tensorize_decompose_at_full_rank_keeps_outputs(fmt):
    model = Small().eval()
    batch = _batch()
    before = model(*batch).detach()
    tensorize(model, format=fmt, max_rank=4096, min_params=256, init="decompose")
    assert len(factorized_layers(model)) == 4
    torch.testing.assert_close(model(*batch), before, atol=1e-4, rtol=1e-3)


def test_tensorize_decompose_cp_is_closer_than_random():
    batch = _batch()
    model = Small().eval()
    before = model(*batch).detach()
    random, decomposed = Small().eval(), Small().eval()
    random.load_state_dict(model.state_dict())
    decomposed.load_state_dict(model.state_dict())
    tensorize(random, format="cp", max_rank=16, min_params=256, include=["body.0"])
    tensorize(decomposed, format="cp", max_rank=16, min_params=256, include=["body.0"], init="decompose")
    assert rel_err(decomposed(*batch), before) < rel_err(random(*batch), before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensorized_model_trains(fmt):
    torch.manual_seed(1)
    model = Small()
    tensorize(model, format=fmt, max_rank=4, min_params=256)
    batch = _batch(32)
    target = torch.randint(0, 2, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(*batch), target)
        loss.backward()
        assert all(p.grad is not None for layer in factorized_layers(model).values() for p in layer.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_tensorize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="format"):
        tensorize(Small(), format="svd", max_rank=4)
    with pytest.raises(ValueError, match="max_rank"):
        tensorize(Small(), format="tt", max_rank=0)
    with pytest.raises(ValueError, match="init"):
        tensorize(Small(), format="tt", max_rank=4, init="pretrained")
    with pytest.raises(ValueError, match="min_params"):
        tensorize(Small(), format="tt", max_rank=4, min_params=-1)
    model = Small()
    with pytest.raises(ValueError):
        tensorize(model, format="tt", max_rank=0)
    assert not any(isinstance(m, FactorizedLayer) for m in model.modules())  # nothing half-converted


def test_tensorize_leaves_unsupported_convs_dense_and_fails_atomically():
    model = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 8, 3, padding="same"),
                          nn.Conv2d(8, 8, 3, padding_mode="reflect"), nn.Linear(64, 32))
    report = tensorize(model, format="tt", max_rank=4, min_params=0)
    assert [r["layer"] for r in report] == ["0", "4"]
    assert [type(m) for m in model[1:4]] == [nn.Conv2d] * 3

    # three per-edge ranks fit the Linear (4 TT cores) but not the table (6 cores): nothing is replaced
    model = nn.Sequential(nn.Linear(64, 64), nn.Embedding(100, 8))
    original = list(model)
    with pytest.raises(ValueError, match="max_rank"):
        tensorize(model, format="tt", max_rank=[4, 4, 4], min_params=0)
    assert list(model) == original


@pytest.mark.parametrize("init", ["random", "decompose"])
def test_tensorize_shapes_set_the_named_layers_and_leave_the_others_balanced(init):
    model, reference = Small(), Small()
    reference.load_state_dict(model.state_dict())
    shapes = {"body.0": {"in_shape": [4, 4, 4, 4], "out_shape": [2, 2, 4, 4]}, "bag": {"shape": [[5, 10, 10], [2, 2, 4]]}}
    report = tensorize(model, format="ttm", max_rank=64, min_params=256, init=init, shapes=shapes)
    layers = {r["layer"]: r for r in report}
    assert layers["body.0"]["tensor_shape"] == [2, 2, 4, 4, 4, 4, 4, 4]
    assert layers["bag"]["tensor_shape"] == [5, 10, 10, 2, 2, 4]
    assert layers["emb"]["tensor_shape"] == FactorizedEmbedding(1000, 16, format="ttm", max_rank=4).weight.modes
    if init == "decompose":  # full rank: the explicit shapes change the layout, not the function
        batch = _batch()
        assert rel_err(model(*batch), reference(*batch)) < 1e-4


@pytest.mark.parametrize("shapes, message", [
    ({"head": {"in_shape": [8, 12]}}, "shapes.head: not a layer this run factorizes; those are: conv, body.0, emb, bag"),
    ({"body.0": {"shape": [[16, 16], [8, 8]]}}, "shapes.body.0: expected a mapping with in_shape and/or out_shape"),
    ({"bag": {"in_shape": [20, 25]}}, "shapes.bag: expected a mapping with shape"),
    ({"body.0": {"in_shape": [4, 4]}}, "shapes.body.0.in_shape: the product of [4, 4] is 16, smaller than 256"),
    ({"body.0": {"in_shape": [16, 16], "out_shape": [2, 4, 8]}}, "shapes.body.0.in_shape: ttm pairs each out_shape factor"),
    ([["body.0", [16, 16]]], "shapes: expected a mapping layer name"),
])
def test_tensorize_shape_errors_name_the_layer_and_leave_the_model_unchanged(shapes, message):
    model = Small()
    original = list(model.children())
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tensorize(model, format="ttm", max_rank=4, min_params=256, shapes=shapes)
    assert list(model.children()) == original


def test_pruned_layer_rebuilds_from_config():
    model = Small()
    tensorize(model, format="tt", max_rank=4, min_params=256)
    layer = model.body[0]
    layer.weight.set_mask(0, torch.tensor([True, False, True, False])[: layer.max_ranks[0]])
    layer.prune()
    rebuilt = FactorizedLinear(**layer.config())
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(2, 256)
    torch.testing.assert_close(rebuilt(x), layer(x))
    assert math.prod(layer.dense_shape) == 64 * 256
