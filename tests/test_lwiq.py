"""LWIQ: imprinted proxy accuracy, significance-driven ranks, one measurement for every budget."""

import json

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from ranksearch.models.rank_selection import BudgetError, make_method
from ranksearch.models.rank_selection.budget import minimum_params, tensorized_params
from ranksearch.models.rank_selection.lwiq import LWIQRank, imprint_accuracy, pool_features, significance
from ranksearch.models.tensorized import FactorizedConv2d, FactorizedEmbeddingBag, FactorizedLinear, from_dense


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def noisy_digits():
    """Digits with 64 appended N(0, 1) columns: noise swamps the cosine of raw inputs (imprinting
    ~35 %), the first layer learns to ignore it, so the first layer is clearly the significant one."""
    data = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(data.target), generator=g)
    x = torch.tensor(data.data, dtype=torch.float32)[perm] / 16
    x = torch.cat([x, torch.randn(len(x), 64, generator=g)], 1)
    y = torch.tensor(data.target)[perm]
    return x[:1300], y[:1300], x[1300:], y[1300:]


@pytest.fixture(scope="module")
def trained(noisy_digits):
    """A 3-layer CP MLP trained a few epochs through the method's lifecycle, then measured once."""
    x, y, xh, yh = noisy_digits
    torch.manual_seed(0)
    net = nn.Sequential(FactorizedLinear(128, 64, format="cp", max_rank=16), nn.ReLU(),
                        FactorizedLinear(64, 64, format="cp", max_rank=16), nn.ReLU(),
                        FactorizedLinear(64, 10, format="cp", max_rank=16))
    method = make_method("lwiq", warmup_epochs=5)
    method.attach(net)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(method.search_epochs(10)):
        for xb, yb in batches(x, y, 64):
            opt.zero_grad()
            (F.cross_entropy(net(xb), yb) + method.penalty()).backward()
            opt.step()
    forwards = count_forwards(net)
    method.measure(net, batches(xh, yh, 62))
    assert len(forwards) == method.hp["measure_batches"]
    return net, method, forwards


def test_imprinting_is_perfect_on_separable_and_chance_on_random_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (2000,), generator=g)
    separable = F.one_hot(y, 10).float() * 3 + 0.1 * torch.rand(2000, 10, generator=g)
    assert imprint_accuracy(separable[:1000], y[:1000], separable[1000:], y[1000:]) == 1.0
    noise = torch.randn(2000, 32, generator=g)
    assert abs(imprint_accuracy(noise[:1000], y[:1000], noise[1000:], y[1000:]) - 0.1) < 0.05


def test_pooling_keeps_at_most_pool_features():
    assert pool_features(torch.randn(4, 256, 5, 5), 128, spatial=True).shape == (4, 128)
    assert pool_features(torch.randn(4, 32, 5, 5), 128, spatial=True).shape == (4, 128)  # a 2x2 grid
    assert pool_features(torch.randn(4, 50, 5, 5), 128, spatial=True).shape == (4, 50)  # no grid fits: means
    assert pool_features(torch.randn(4, 300), 128).shape == (4, 128)
    assert pool_features(torch.randn(4, 7, 40), 128).shape == (4, 40)
    conv = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(pool_features(conv, 8, spatial=True), conv.mean((2, 3)))
    maps = torch.randn(2, 2, 6, 6)
    assert torch.equal(pool_features(maps, 8, spatial=True), F.adaptive_avg_pool2d(maps, 2).flatten(1))


def identity_ttm(n=16, max_rank=8):
    dense = nn.Linear(n, n)
    with torch.no_grad():
        dense.weight.copy_(torch.eye(n))
        dense.bias.zero_()
    return from_dense(dense, "ttm", max_rank)


def test_the_layer_that_separates_the_classes_gets_the_largest_ranks():
    """Classes c = +-(1 on S_c - 1 on T_c): class means of the input vanish, ReLU separates them.
    Identity layers A, ReLU, B, C: only B's output beats its predecessor, so B is significant."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (800,), generator=g)
    sign = torch.randint(0, 2, (800, 1), generator=g) * 2 - 1
    pattern = torch.zeros(4, 16)
    for c in range(4):
        pattern[c, 4 * c:4 * c + 2], pattern[c, 4 * c + 2:4 * c + 4] = 1, -1
    x = sign * pattern[y] + 0.05 * torch.randn(800, 16, generator=g)
    net = nn.Sequential(identity_ttm(), nn.ReLU(), identity_ttm(), identity_ttm())
    method = LWIQRank()
    method.attach(net)
    method.measure(net, batches(x, y, 100))
    acc = method.state()["proxy_accuracy"]
    assert acc["2"] == 1.0 and acc["3"] == 1.0 and acc["0"] < 0.8
    sig = method.state()["significance"]
    assert sig["2"] == 1.0 and sig["0"] == method.hp["min_share"]
    assert method.state()["output_layer"] == "3" and sig["3"] == 1.0  # the head is not starved
    full = tensorized_params(method.layers, effective=False)
    ranks = method.select(full // 2)
    assert tensorized_params(method.layers) <= full // 2
    assert ranks["2"][0] > ranks["0"][0] and ranks["3"] == ranks["2"]


def test_the_output_layers_gain_does_not_scale_the_other_layers():
    """The head gets the top share whatever its gain; a larger gain of its own must not shrink the
    others (full MNIST, TT 1 %: the first layer fell to 0.45 of the head's share)."""
    gain = {"hidden": 0.035, "mid": 0.01, "head": 0.078}
    assert significance(gain, "head", 0.05) == {"hidden": 1.0, "mid": pytest.approx(0.01 / 0.035), "head": 1.0}
    assert significance({"a": -0.01, "head": 0.05}, "head", 0.05) == {"a": 1.0, "head": 1.0}  # no gain: all equal
    assert significance({"a": 0.02, "b": 0.04}, None, 0.25) == {"a": 0.5, "b": 1.0}  # no output layer known


def test_ranks_follow_the_measured_significance(trained):
    net, method, _ = trained
    sig = method.state()["significance"]
    assert method.state()["layer_order"] == ["0", "2", "4"]
    assert sig["0"] == 1.0 and sig["2"] < 0.5
    assert method.state()["output_layer"] == "4" and sig["4"] == 1.0
    full = tensorized_params(method.layers, effective=False)
    for fraction in (0.3, 0.6):
        ranks = method.select(int(fraction * full))
        scale = method.state()["scale"]
        share = {}
        for name, layer in method.layers.items():
            expected = [max(1, round(min(1.0, scale * sig[name]) * m)) for m in layer.max_ranks]
            assert ranks[name] == layer.ranks == expected
            share[name] = sum(ranks[name]) / sum(layer.max_ranks)
        for a in sig:
            for b in sig:
                if sig[a] > sig[b]:  # more significant -> larger rank fraction (up to rounding)
                    assert share[a] >= share[b] - 0.5 / min(method.layers[b].max_ranks)
        assert share["0"] > share["2"]


def test_budgets_reuse_one_measurement_and_larger_budgets_never_shrink_ranks(trained):
    net, method, forwards = trained
    measured = len(forwards)
    full = tensorized_params(method.layers, effective=False)
    small, large = int(0.25 * full), int(0.7 * full)
    ranks_large = method.select(large)
    assert tensorized_params(method.layers) <= large
    ranks_small = method.select(small)  # masks from the larger budget leave no trace
    assert tensorized_params(method.layers) <= small
    masks = [m.clone() for layer in method.layers.values() for m in layer.rank_masks]
    assert method.allocate(large) == ranks_large  # pure: same answer, masks untouched
    assert all(torch.equal(a, b) for a, b in zip(masks, [m for l in method.layers.values() for m in l.rank_masks]))
    for name in ranks_small:
        assert all(s <= l for s, l in zip(ranks_small[name], ranks_large[name]))
    previous = None
    for fraction in (0.1, 0.2, 0.4, 0.6, 0.8, 1.0):
        ranks = method.allocate(fraction)
        if previous:
            assert all(p <= r for name in ranks for p, r in zip(previous[name], ranks[name]))
        previous = ranks
    assert all(r == m for name, layer in method.layers.items() for r, m in zip(previous[name], layer.max_ranks))
    assert len(forwards) == measured, "select/allocate must not run the model again"


def test_impossible_budget_and_missing_measurement_are_clear_errors(trained):
    net, method, _ = trained
    floor = minimum_params(method.layers)
    assert sum(method.allocate(floor)[name][e] for name in method.layers for e in range(1)) == 3  # rank 1 everywhere
    with pytest.raises(BudgetError, match="below the minimum"):
        method.select(floor - 1)
    fresh = LWIQRank()
    fresh.attach(net)
    with pytest.raises(RuntimeError, match="measure"):
        fresh.select(floor * 2)


def test_slices_with_the_largest_norm_are_kept():
    torch.manual_seed(0)
    layer = FactorizedLinear(16, 16, format="cp", max_rank=6)
    with torch.no_grad():
        for factor in layer.weight.factors:
            factor[:, 4] *= 10
    method = LWIQRank()
    method.attach(nn.Sequential(layer))
    method.measure(layer, [(torch.randn(32, 16), torch.randint(0, 3, (32,))) for _ in range(2)])
    method.select(minimum_params(method.layers))
    assert layer.weight.mask(0).tolist() == [0, 0, 0, 0, 1, 0]
    assert int(torch.argmax(method.importance()["0"][0])) == 4


class Branches(nn.Module):
    """Registers `late` before `early` but runs `early` first; an EmbeddingBag fed by (ids, offsets)."""

    def __init__(self):
        super().__init__()
        self.late = FactorizedLinear(32, 4, format="tt", max_rank=4)
        self.bag = FactorizedEmbeddingBag(100, 16, format="tt", max_rank=4)
        self.early = FactorizedConv2d(1, 16, 3, format="tucker", max_rank=4, padding=1)

    def forward(self, ids, offsets, image):
        feats = torch.cat([self.early(image).mean((2, 3)), self.bag(ids, offsets)], 1)
        return self.late(feats)


def test_execution_order_tuple_inputs_and_conv_embedding_layers():
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        y = torch.randint(0, 4, (20,), generator=g)
        ids = torch.randint(0, 100, (60,), generator=g)
        data.append(((ids, torch.arange(0, 60, 3), torch.randn(20, 1, 6, 6, generator=g)), y))
    model = Branches()
    method = make_method("lwiq")
    method.attach(model)
    method.measure(model, data)
    state = method.state()
    assert state["layer_order"] == ["early", "bag", "late"]
    fit_y, eval_y = torch.cat([y for _, y in data[:2]]), torch.cat([y for _, y in data[2:]])
    majority = float((eval_y == torch.mode(fit_y).values).float().mean())
    assert state["input_proxy_accuracy"] == pytest.approx(majority)  # no float input: featureless baseline
    budget = (minimum_params(method.layers) + tensorized_params(method.layers)) // 2
    method.select(budget)
    method.detach()
    for layer in method.layers.values():
        layer.prune()
    assert tensorized_params(method.layers) <= budget
    assert model(*data[0][0]).shape == (20, 4)


def test_lifecycle_defaults_state_and_hyperparameter_checks(trained):
    _, method, _ = trained
    assert make_method("lwiq").search_epochs(5) == 1 and make_method("lwiq").search_epochs(0) == 0
    state = json.loads(json.dumps(method.state()))
    assert set(state) >= {"proxy_accuracy", "significance", "gain", "measure_time_s", "input_proxy_accuracy"}
    assert state["measure_time_s"] > 0 and state["measure_samples"] == 8 * 62
    assert LWIQRank().state() == {}
    with pytest.raises(ValueError, match="min_share"):
        LWIQRank(min_share=0)
    with pytest.raises(ValueError, match="pool_features"):
        make_method("lwiq", pool_features=0)


def test_paper_mode_measures_a_dense_trained_network_then_decomposes_at_the_allocated_ranks():
    """`start: dense` (preset paper): dense warm-up epochs, then the trained dense net is measured, each
    layer decomposed at its allocated ranks, and the rest fine-tuned; same total epochs as today's mode."""
    from ranksearch.models.train import fit

    phases = {}
    for mode, params in (("paper", {"preset": "paper"}), ("today", {})):
        rows = []
        record = fit(model="mlp", dataset="digits", method="lwiq", format="tt", budget=0.1, method_params=params,
                     train={"epochs": 3, "finetune_epochs": 1, "max_rank": 8, "lr": 1e-2},
                     dataset_options={"max_train": 400}, on_epoch=rows.append)
        assert record["budget_met"] and record["epochs_done"] == 4
        phases[mode] = [r["phase"] for r in rows]
        state = record["method_state"]
        assert all(a is not None for a in state["proxy_accuracy"].values())
        assert record["rank_search_time_s"] > state["measure_time_s"]
        if mode == "paper":
            # the measured net was trained: its first layer separates digits better than chance (~10 %)
            assert max(state["proxy_accuracy"].values()) > 0.5
    assert phases["paper"] == ["dense", "dense", "train", "finetune"]
    assert phases["today"] == ["search", "train", "train", "finetune"]
    with pytest.raises(ValueError, match="start"):
        make_method("lwiq", start="pretrained")


def test_a_fractional_warm_up_measures_partway_through_the_first_epoch():
    """`warmup_epochs` 0.5: the first half of epoch 1's batches warm up, the pruned model trains the
    other half (same batch order) and the remaining epochs, so the run still trains epochs +
    finetune_epochs in all; the warm-up epoch is most of LWIQ's rank-search time (LeNet-5)."""
    from ranksearch.models.train import fit

    rows = []
    record = fit(model="mlp", dataset="digits", method="lwiq", format="tt", budget=0.1,
                 method_params={"warmup_epochs": 0.5}, train={"epochs": 3, "finetune_epochs": 1, "max_rank": 8, "lr": 1e-2},
                 dataset_options={"max_train": 400}, on_epoch=rows.append)
    assert record["budget_met"] and record["epochs_done"] == 4
    assert [r["phase"] for r in rows] == ["train", "train", "train", "finetune"]  # epoch 1 ends after the selection
    assert record["method_state"]["significance"]
    assert make_method("lwiq", warmup_epochs=0.5).search_epochs(3) == 0.5
    for bad in (-0.5, "one", False, float("inf")):
        with pytest.raises(ValueError, match="warmup_epochs"):
            make_method("lwiq", warmup_epochs=bad)


@pytest.mark.parametrize("refit, too_large", [(True, False), (False, False), (True, True)])
def test_warmed_up_layers_are_decomposed_afresh_at_the_allocated_ranks(refit, too_large, monkeypatch):
    """`refit` (default): after select and prune, fit replaces each warmed-up layer by the TT-SVD of
    its own full tensor at the allocated ranks, which approximates it better than keeping the
    largest slices (full MNIST TT 1 %: +0.6 points); layers too large to hold dense keep their slices."""
    from ranksearch.models import strategies
    from ranksearch.models.tensorized.formats import TensorTrain
    from ranksearch.models.train import fit

    if too_large:
        monkeypatch.setattr(strategies, "REFIT_MAX_ENTRIES", 0)

    calls = []
    original = TensorTrain.decompose_from

    def spy(self, tensor):
        before = self.full().detach().clone()
        original(self, tensor)
        after = self.full().detach()
        assert list(self.max_ranks) == self.ranks and tensor.shape == after.shape
        calls.append(((after - tensor).norm() <= (before - tensor).norm() + 1e-6, self.ranks))

    monkeypatch.setattr(TensorTrain, "decompose_from", spy)
    record = fit(model="mlp", dataset="digits", method="lwiq", format="tt", budget=0.04, method_params={"refit": refit},
                 train={"epochs": 2, "finetune_epochs": 0, "max_rank": 8, "lr": 1e-2}, dataset_options={"max_train": 400})
    assert record["budget_met"]
    if refit and not too_large:  # one per tensorized layer, at its selected ranks, closer to the warmed-up tensor than the slices kept
        assert [ranks for _, ranks in calls] == [layer["ranks"] for layer in record["layers"]]
        assert all(closer for closer, _ in calls)
        assert any(r < 8 for _, ranks in calls for r in ranks)  # the budget did truncate
    else:
        assert calls == []
