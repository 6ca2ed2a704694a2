"""Shape factorizations: how a dimension is split into the modes of a tensor format.

Balanced modes give the best compression for a given rank. When a size factors
badly (a large prime, say) we pad it up, as TT-Rec's suggested shapes do: inputs
are zero-padded and outputs truncated, so padding changes nothing functionally.
"""

from __future__ import annotations

import math


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def _greedy_balanced(n: int, order: int) -> list[int]:
    """Distribute prime factors largest-first into the currently smallest bucket."""
    buckets = [1] * order
    for p in sorted(prime_factors(n), reverse=True):
        buckets[buckets.index(min(buckets))] *= p
    return sorted(buckets)


def factorize(n: int, order: int, *, max_imbalance: float = 4.0) -> list[int]:
    """`order` factors of about n**(1/order) whose product is >= n (== n when n splits well)."""
    if n < 1 or order < 1:
        raise ValueError(f"factorize: need n >= 1 and order >= 1, got n={n}, order={order}")
    exact = _greedy_balanced(n, order)
    target = n ** (1.0 / order)
    if n < 2**order or exact[-1] <= max_imbalance * max(target, 1.0):
        return exact
    # pad: all factors ceil(target), then shrink from the end while the product still covers n
    factors = [math.ceil(target)] * order
    for i in reversed(range(order)):
        while factors[i] > 1 and math.prod(factors[:i] + [factors[i] - 1] + factors[i + 1 :]) >= n:
            factors[i] -= 1
    return sorted(factors)


def default_order(n: int, *, max_order: int = 4) -> int:
    """Number of modes for a dimension: about one mode per factor of 8, between 2 and max_order."""
    return max(2, min(max_order, math.ceil(math.log2(max(n, 2)) / 3)))


def resolve_shape(argument: str, shape, size: int, order: int | None = None) -> list[int]:
    """Validate an explicit mode shape for `size`, or compute a balanced one of `order` modes."""
    if shape is None:
        return factorize(size, order or default_order(size))
    if not isinstance(shape, (list, tuple)):
        raise ValueError(f"{argument}: expected a list of positive integers, got {shape!r}")
    shape = list(shape)
    if not shape or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"{argument}: expected a list of positive integers, got {shape!r}")
    if math.prod(shape) < size:
        raise ValueError(
            f"{argument}: the product of {shape} is {math.prod(shape)}, smaller than {size}; "
            f"the factors must multiply to at least {size}"
        )
    return shape
