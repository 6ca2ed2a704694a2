"""Probabilistic L0 gates: gate values, expected-parameter penalty, recovery, budgets, freezing, detach."""

import copy
import functools
import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ranksearch.models.rank_selection import make_method
from ranksearch.models.rank_selection.budget import tensorized_params
from ranksearch.models.tensorized import FactorizedLinear
from rank_teacher import check_impossible_budget_is_a_clear_error, check_select_meets_budget, compress, fresh_masks, teacher_data, teacher_student, train

N = 1024
# Test settings, checked on seeds 0-9 of every case. lam prices the whole tensor: a CP slice carries
# 1/8 of it, so lam must stay well below 8 x (the loss of one true component, ~1/3 of the output
# variance); TT/TTM slices carry less, and there a larger lam is what stops open gates from
# saturating (where the penalty's gradient vanishes) before the signal has gathered into few slices.
# sigma 0.75 keeps that gradient alive a little longer than the default 0.5; gates learn at the
# weights' lr, as in the authors' code.
LAM = {"ttm": 2.5, "tt": 2.5, "cp": 1.5}
HP = dict(sigma=0.75, gate_lr=3e-3)


@functools.cache
def fit(format, seed=0):
    """A student trained against its teacher (cached: tests that change it work on a deep copy)."""
    teacher, student = teacher_student(format, seed)
    method = make_method("l0", lam=LAM[format], **HP)
    train(student, method, teacher_data(teacher, N, seed=seed), epochs=30, lr=3e-3, batch_size=32, seed=seed)
    return teacher, student, method


def attached(format="ttm", **hp):
    torch.manual_seed(0)
    layer = FactorizedLinear(27, 27, format=format, max_rank=4, in_shape=[3, 3, 3], out_shape=[3, 3, 3])
    method = make_method("l0", **hp)
    method.attach(layer)
    return layer, method


def set_mu(method, values):
    with torch.no_grad():
        for mu, v in zip(method.mu[0], values):
            mu.copy_(torch.tensor(v))


# -- gates and penalty ---------------------------------------------------------------------------
def test_gates_are_clipped_noisy_in_training_and_deterministic_at_eval():
    layer, method = attached()
    set_mu(method, [[0.3, -0.5, -1.5, -0.9], [-2.0, -0.2, -1.0, -3.0]])
    gate = layer.weight.slice_gates
    layer.eval()
    assert torch.allclose(gate(0), torch.tensor([1.0, 0.7, 0.0, 0.3]))
    assert torch.allclose(gate(1), torch.tensor([0.0, 1.0, 0.2, 0.0]))  # slice 1 has the highest mu: held open
    layer.train()
    draws = torch.stack([gate(0) for _ in range(200)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert draws[:, 1].std() > 0.1  # noisy where mu + shift is inside (0, 1)
    assert torch.all(draws[:, 0] == 1)  # the forced slice is never noisy


def test_penalty_is_expected_parameter_fraction():
    layer, method = attached(lam=0.7, sigma=0.6)
    mu = [[0.3, -0.5, -1.5, -0.9], [-2.0, -0.2, -1.0, -3.0]]
    set_mu(method, mu)
    p = norm.cdf((np.array(mu) + 1.2) / 0.6)
    p[0, 0] = p[1, 1] = 1.0  # the highest mu of each edge is held open
    r0, r1 = p.sum(axis=1)
    expected = (9 * r0 + 9 * r0 * r1 + 9 * r1) / (9 * 4 + 9 * 16 + 9 * 4)  # cores (1,3,3,r0) (r0,3,3,r1) (r1,3,3,1)
    assert method.penalty().item() == pytest.approx(0.7 * expected, rel=1e-5)
    method.penalty().backward()
    grads = method.mu[0][0].grad
    assert grads[0] == 0 and torch.all(grads[1:] > 0)  # the held slice costs nothing more; others pay


def test_cp_penalty_is_mean_open_probability():
    layer, method = attached("cp", lam=1.0)
    mu = [[0.5, -1.0, -1.3, -2.0]]
    set_mu(method, mu)
    p = norm.cdf((np.array(mu[0]) + 1.2) / 0.5)
    p[0] = 1.0
    assert method.penalty().item() == pytest.approx(p.mean(), rel=1e-5)


def test_gates_get_their_own_learning_rate():
    _, method = attached(gate_lr=0.05)
    (group,) = method.param_groups(lr=1e-3)
    assert group["lr"] == 0.05 and len(group["params"]) == 2


# -- rank recovery ---------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["ttm", "tt", "cp"])
def test_recovers_teacher_ranks(format):
    teacher, student, method = fit(format)
    found = method.state()["ranks_at_eval_gates"][""]
    assert all(abs(f - t) <= 1 for f, t in zip(found, teacher.ranks)), (found, teacher.ranks)
    fresh_masks(method)
    assert method.select(10**9)[""] == found  # no budget pressure: the natural masks alone


# -- budgets, freezing, detach ------------------------------------------------------------------
@pytest.mark.parametrize("budget", ["fraction", "tight"])
def test_select_meets_budget(budget):
    check_select_meets_budget(fit("ttm")[2], budget)


def test_impossible_budget_is_a_clear_error():
    check_impossible_budget_is_a_clear_error(fit("ttm")[2])


def test_freezes_exactly_when_target_is_reached():
    layer, method = attached()
    set_mu(method, [[0.3, -0.5, -1.5, -0.9], [-2.0, -0.2, -1.0, -3.0]])  # eval ranks [3, 2]
    at_gates = method.eval_params()
    assert at_gates == 9 * 3 + 9 * 3 * 2 + 9 * 2 + 27
    method.budget_params = at_gates - 1
    method.step(0, 0)
    assert not method.frozen
    method.budget_params = at_gates
    method.step(0, 1)
    assert method.frozen and method.param_groups(1e-3) == []
    assert all(not mu.requires_grad for mu in method.mu.parameters())
    layer.train()
    assert torch.equal(layer.weight.slice_gates(0), layer.weight.slice_gates(0))  # no noise once frozen
    assert method.penalty().item() == 0


def test_frozen_gates_stay_put_while_training_continues():
    teacher, student = teacher_student("ttm", seed=5)
    method = make_method("l0", lam=LAM["ttm"], **{**HP, "gate_lr": 2e-2})  # fast gates: the target comes early
    target = int(0.5 * tensorized_params({"": student}, effective=False))
    train(student, method, teacher_data(teacher, N, seed=5), epochs=10, lr=3e-3, batch_size=32, budget_params=target)
    assert method.frozen
    assert method.eval_params() <= target
    before = [mu.detach().clone() for mu in method.mu[0]]
    train_more = torch.optim.Adam([{"params": list(student.parameters())}, *method.param_groups(3e-3)], lr=3e-3)
    x, y = teacher_data(teacher, 64, seed=6)
    student.train()
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(student(x), y) + method.penalty()
        train_more.zero_grad()
        loss.backward()
        train_more.step()
        method.step(10, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, method.mu[0]))


def test_detach_and_prune_keep_eval_outputs():
    _, student, method = copy.deepcopy(fit("tt"))
    fresh_masks(method)
    x = torch.randn(32, student.in_features)
    with torch.no_grad():
        method.select(10**9)
        student.eval()
        before = student(x)
        student.train()  # detach must fold the evaluation gates whatever the mode
        compress(student, method, 10**9)
        assert student.weight.slice_gates is None
        after = student(x)
    assert student.ranks == method.state()["ranks_at_eval_gates"][""]
    assert torch.allclose(before, after, atol=1e-5)


def test_state_is_json():
    _, _, method = fit("ttm")
    state = json.loads(json.dumps(method.state()))
    assert set(state) >= {"open_prob", "ranks_at_eval_gates", "frozen", "eval_params"}


def test_rejects_nonpositive_sigma():
    with pytest.raises(ValueError, match="sigma"):
        make_method("l0", sigma=0.0)
