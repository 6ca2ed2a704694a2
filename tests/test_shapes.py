"""Shape factorizations: balanced modes, exact when possible, padded when a size factors badly."""

import math

import pytest

from ranksearch.models.tensorized.shapes import default_order, factorize, prime_factors, resolve_shape


@pytest.mark.parametrize("n", [1, 2, 7, 10, 13, 64, 100, 128, 512, 784, 1000, 4096, 10**6, 10**7, 1000003, 999983])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_factorize_covers_n_with_the_requested_order(n, order):
    factors = factorize(n, order)
    assert len(factors) == order
    assert all(isinstance(f, int) and f >= 1 for f in factors)
    assert math.prod(factors) >= n
    assert factors == sorted(factors)


def test_factorize_is_exact_and_balanced_when_n_splits_well():
    assert factorize(784, 4) == [4, 4, 7, 7]
    assert factorize(512, 3) == [8, 8, 8]
    assert factorize(4096, 4) == [8, 8, 8, 8]
    assert factorize(128, 3) == [4, 4, 8]
    big = factorize(10**7, 3)
    assert math.prod(big) == 10**7
    assert max(big) / min(big) <= 1.5  # e.g. [200, 200, 250]
    million = factorize(10**6, 3)
    assert million == [100, 100, 100]


@pytest.mark.parametrize("n,order", [(1000003, 3), (999983, 2), (10007, 2), (2 * 500009, 3)])
def test_factorize_pads_sizes_that_factor_badly(n, order):
    factors = factorize(n, order)
    target = n ** (1 / order)
    assert math.prod(factors) >= n
    assert math.prod(factors) < n * 1.1  # little padding
    assert max(factors) <= 2 * target  # balanced, not [1, 1, n]


def test_factorize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n"):
        factorize(0, 3)
    with pytest.raises(ValueError, match="order"):
        factorize(10, 0)


def test_prime_factors_and_default_order():
    assert prime_factors(784) == [2, 2, 2, 2, 7, 7]
    assert prime_factors(1000003) == [1000003]
    assert math.prod(prime_factors(10**7)) == 10**7
    assert default_order(10) == 2
    assert default_order(512) == 3
    assert default_order(784) == 4
    assert default_order(10**7) == 4
    assert 2 <= default_order(1) <= 4


def test_resolve_shape_validates_explicit_shapes_and_names_the_argument():
    assert resolve_shape("in_shape", [4, 4, 7, 7], 784) == [4, 4, 7, 7]
    assert resolve_shape("in_shape", (4, 5), 19) == [4, 5]  # padding is allowed
    assert resolve_shape("in_shape", None, 784, 2) == factorize(784, 2)
    with pytest.raises(ValueError, match="in_shape"):
        resolve_shape("in_shape", [4, 4, 7], 784)
    with pytest.raises(ValueError, match="out_shape"):
        resolve_shape("out_shape", [0, 8], 8)
    with pytest.raises(ValueError, match="shape"):
        resolve_shape("shape", [], 8)
    with pytest.raises(ValueError, match="in_shape"):
        resolve_shape("in_shape", [2.0, 4], 8)
    with pytest.raises(ValueError, match="in_shape"):
        resolve_shape("in_shape", 8, 8)
