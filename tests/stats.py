"""Bounds for the tests' statistical checks, so each states its false-failure rate.

The kernel picks an endpoint slot with bpf_get_prandom_u32() per connection: counts per
endpoint are binomial (multinomial together). A check that allows the range from
`binomial_range` fails a correct datapath with probability at most `alpha`.
"""

from __future__ import annotations

from math import exp, lgamma, log

FALSE_FAILURE = 1e-4  # the project's ceiling for a statistical test's false-failure rate


def binomial_range(n: int, p: float, alpha: float = FALSE_FAILURE) -> tuple[int, int]:
    """(lo, hi) with P(X < lo) + P(X > hi) <= alpha for X ~ Binomial(n, p), alpha/2 a side."""
    assert 0 < p < 1 and n > 0
    pmf = [exp(lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1) + k * log(p)
               + (n - k) * log(1 - p)) for k in range(n + 1)]
    lo, tail = 0, 0.0
    while tail + pmf[lo] <= alpha / 2:
        tail += pmf[lo]
        lo += 1
    hi, tail = n, 0.0
    while tail + pmf[hi] <= alpha / 2:
        tail += pmf[hi]
        hi -= 1
    return lo, hi
