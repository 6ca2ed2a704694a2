"""The shared RankMethod behaviour: how many epochs a method searches, budgets, what select keeps."""

import pytest

from ranksearch.models.rank_selection import make_method
from ranksearch.models.tensorized import factorized_layers


@pytest.mark.parametrize("name", ["bayesian", "l0"])
def test_search_fraction_splits_the_epochs(name):
    assert make_method(name).search_epochs(10) == 5  # default 0.5: the pruned model trains the other half
    assert make_method(name, search_fraction=1.0).search_epochs(10) == 10
    assert make_method(name, search_fraction=0.01).search_epochs(10) == 1  # at least one epoch
    assert make_method(name).search_epochs(0) == 0


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, "half"])
def test_search_fraction_outside_0_1_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="search_fraction"):
        make_method("l0", search_fraction=bad)


def test_the_budget_is_handed_over_once_at_attach():
    from torch import nn

    from ranksearch.models.rank_selection.budget import minimum_params, tensorized_params
    from ranksearch.models.tensorized import FactorizedLinear

    net = nn.Sequential(FactorizedLinear(64, 64, format="tt", max_rank=8))
    unattached = make_method("l0")
    unattached.attach(net)
    with pytest.raises(ValueError, match="no budget"):
        unattached.select()
    method = make_method("l0")
    budget = minimum_params(factorized_layers(net)) + 40
    method.attach(net, budget)
    method.select()
    assert tensorized_params(method.layers) <= budget


# -- budget-aware search (schedule.py) -------------------------------------------------------------
def _search(name, budget_fraction, epochs=12, **hp):
    """A TTM student against a rank-[2, 3] teacher, searched towards a budget below the teacher's ranks."""
    from rank_teacher import teacher_data, teacher_student, train

    from ranksearch.models.rank_selection.budget import resolve_budget, tensorized_params

    teacher, student = teacher_student("ttm", seed=0)
    method = make_method(name, **hp)
    budget = resolve_budget(budget_fraction, {"": student})
    train(student, method, teacher_data(teacher, 512, seed=0), epochs=epochs, lr=3e-3, batch_size=32,
          budget_params=budget, plan=True)
    at_search_end = tensorized_params(method.layers)
    method.select()
    return method, budget, at_search_end


@pytest.mark.parametrize("name", ["bayesian", "l0"])
def test_budget_aware_search_reaches_the_budget_before_select(name):
    method, budget, at_search_end = _search(name, 0.15)
    state = method.state()
    assert at_search_end <= budget  # the cuts of the search ended at the budget; select cut nothing more
    assert state["reached_params"] == at_search_end and state["budget_params"] == budget
    assert state["reached_over_budget"] <= 1.0
    paper, budget, _ = _search(name, 0.15, preset="paper")
    assert paper.state()["reached_over_budget"] > 1.5  # left to itself the method stops far above it


def test_l0_reaches_the_budget_by_its_cuts_without_a_dual_unless_asked():
    """L0's dual is off by default (l0.py: on full MNIST it closed a whole TTM edge); the cuts alone
    bring the search to the budget, and `dual_lr` > 0 still raises the penalty while over it."""
    method, budget, at_search_end = _search("l0", 0.15)
    assert method.nu == 0 and at_search_end <= budget
    method, budget, at_search_end = _search("l0", 0.15, dual_lr=0.6)
    assert method.nu > 0 and at_search_end <= budget


def test_paper_preset_fills_in_defaults_but_not_explicit_values():
    from ranksearch.models.rank_selection import resolve_preset
    from ranksearch.models.rank_selection.hyperparams import METHOD_DEFAULTS

    hp = resolve_preset("l0", {"preset": "paper", "lam": 0.5})
    assert hp["budget_aware"] is False and hp["lam"] == 0.5
    # a spec passes every default along: those still give way to the preset
    assert resolve_preset("bayesian", {**METHOD_DEFAULTS["bayesian"], "preset": "paper"})["budget_aware"] is False
    with pytest.raises(ValueError, match="preset"):
        make_method("l0", preset="papr")


@pytest.mark.parametrize("bad", [(0.8, 0.2), (-0.1, 0.5), (0.2, 1.5)])
def test_cut_window_must_be_ordered_fractions(bad):
    with pytest.raises(ValueError, match="cut_start"):
        make_method("l0", cut_start=bad[0], cut_end=bad[1])


# -- cost-aware selection (budget.prune_to_budget) --------------------------------------------------
def _toy():
    """Two TTM layers of one edge each: dropping a slice of `big` frees 512 parameters, of `small` 32."""
    import torch
    from torch import nn

    from ranksearch.models.tensorized import FactorizedLinear

    net = nn.ModuleDict({"big": FactorizedLinear(256, 256, format="ttm", max_rank=4, in_shape=[16, 16], out_shape=[16, 16]),
                         "small": FactorizedLinear(16, 16, format="ttm", max_rank=4, in_shape=[4, 4], out_shape=[4, 4])})
    importance = {"big": [torch.tensor([1.0, 0.9, 0.8, 0.7])], "small": [torch.tensor([1.0, 0.6, 0.5, 0.4])]}
    return factorized_layers(net), importance


@pytest.mark.parametrize("cost_power", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("scope", ["layer", "edge"])
def test_cost_aware_cut_keeps_the_cheap_important_slices(cost_power, scope):
    from ranksearch.models.rank_selection import prune_to_budget
    from ranksearch.models.rank_selection.budget import tensorized_params

    layers, importance = _toy()
    budget = tensorized_params(layers) - 512  # one slice of the big layer is enough
    prune_to_budget(layers, importance, budget, cost_power=cost_power, cost_scope=scope)
    assert tensorized_params(layers) <= budget
    ranks = {name: layer.ranks for name, layer in layers.items()}
    if cost_power == 0:  # importance alone spends the small layer's slices first, saving 32 each
        assert ranks == {"big": [3], "small": [1]}
    else:  # per parameter saved, the big layer's weakest slice is the cheaper loss
        assert ranks == {"big": [3], "small": [4]}
        assert layers["big"].rank_masks[0].tolist() == [1, 1, 1, 0]  # and it is that weakest one


def test_layer_scope_leaves_the_choice_within_a_layer_to_importance():
    """One TT layer whose middle edge joins the two large cores: per edge, cost alone would cut it
    first although its slices matter most; with cost compared across layers only, importance picks."""
    import torch

    from ranksearch.models.rank_selection import prune_to_budget
    from ranksearch.models.tensorized import FactorizedLinear

    def cut(scope):
        net = FactorizedLinear(256, 256, format="tt", max_rank=4, in_shape=[16, 16], out_shape=[16, 16])
        layers = {"": net}
        # cores (1,16,r0) (r0,16,r1) (r1,16,r2) (r2,16,1): a middle slice frees 128 parameters, an outer one 80
        importance = {"": [torch.tensor([0.5, 0.4, 0.3, 0.25]), torch.tensor([1.0, 0.9, 0.8, 0.3]),
                           torch.tensor([0.5, 0.4, 0.3, 0.25])]}
        prune_to_budget(layers, importance, net.num_parameters() - 100, cost_power=1.0, cost_scope=scope)
        return net.ranks

    assert cut("layer") == [3, 4, 3]  # the less important outer slices go, the middle edge keeps all
    assert cut("edge") == [4, 3, 4]  # per parameter saved (0.3/128 < 0.25/80), the middle slice went
    with pytest.raises(ValueError, match="cost_scope"):
        cut("everything")


@pytest.mark.parametrize("name", ["bayesian", "l0"])
def test_default_cuts_compare_importance_alone(name):
    """The penalties already charge a slice's size, so by default the cut does not divide by it
    again: with cost_power 0.5 the full-MNIST MLP's first layer was cut to [6, 4, 2] while the
    cheap head kept [7, 17] (Bayesian TTM 1 %, -0.6 points against importance alone)."""
    from ranksearch.models.rank_selection import prune_to_budget
    from ranksearch.models.rank_selection.budget import tensorized_params

    layers, importance = _toy()
    prune_to_budget(layers, importance, tensorized_params(layers) - 512, **make_method(name).cost_options())
    assert {n: layer.ranks for n, layer in layers.items()} == {"big": [3], "small": [1]}


@pytest.mark.parametrize("bad", [{"cost_scope": "slice"}, {"cost_power": -1}, {"cost_power": "high"}])
def test_cost_options_are_checked_when_the_method_is_made(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_method("bayesian", **bad)


def _one_slice_method(budget_aware: bool):
    """A method whose own choice keeps one slice per edge (the most important: the last one)."""
    import torch

    from ranksearch.models.rank_selection.base import RankMethod

    class OneSlice(RankMethod):
        name = "one-slice"

        def _attach(self):
            pass

        def importance(self):
            return {name: [torch.arange(1.0, n + 1) for n in layer.max_ranks] for name, layer in self.layers.items()}

        def natural_masks(self):
            return {name: [torch.arange(n) == n - 1 for n in layer.max_ranks] for name, layer in self.layers.items()}

    return OneSlice(budget_aware=budget_aware)


@pytest.mark.parametrize("budget_aware", [True, False])
def test_select_refills_to_the_budget_what_the_methods_threshold_dropped_below_it(budget_aware):
    from torch import nn

    from ranksearch.models.rank_selection.budget import tensorized_params
    from ranksearch.models.tensorized import FactorizedLinear

    net = nn.Sequential(FactorizedLinear(64, 64, format="tt", max_rank=8), FactorizedLinear(64, 64, format="tt", max_rank=8))
    budget = tensorized_params(factorized_layers(net)) // 3
    method = _one_slice_method(budget_aware)
    method.attach(net, budget)
    ranks = method.select()
    natural = method.reached_params
    assert natural < budget // 4  # one slice per edge: far under the budget
    if budget_aware:  # asked for the budget: the most important dropped slices come back, up to it
        assert natural < tensorized_params(method.layers) <= budget
        assert all(r > 1 for rs in ranks.values() for r in rs)
        for layer in method.layers.values():  # the slices kept are the most important (the last ones)
            for edge, rank in enumerate(layer.ranks):
                mask = layer.weight.mask(edge) != 0
                assert bool(mask[-rank:].all()) and not bool(mask[:-rank].any())
    else:
        assert tensorized_params(method.layers) == natural and all(r == 1 for rs in ranks.values() for r in rs)


@pytest.mark.parametrize("name", ["bayesian", "l0"])
def test_the_dual_step_is_per_epoch_whatever_the_epochs_length(name):
    """dual_lr is per epoch: per optimizer step on 469-step full-MNIST epochs, the KL boost hit its
    cap within ~100 steps and every slice of an MLP collapsed (accuracy 0.11)."""
    from ranksearch.models.rank_selection.base import RankMethod

    method = make_method(name, dual_lr=0.6)
    assert method.dual_step() == pytest.approx(0.6 / 64)  # first epoch: length unknown
    for batch in range(469):
        RankMethod.step(method, 0, batch)  # unattached: only the epoch bookkeeping runs
    RankMethod.step(method, 1, 0)
    assert method.dual_step() == pytest.approx(0.6 / 469)
