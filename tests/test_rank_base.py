"""The shared RankMethod behaviour: how many epochs a method searches."""

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
