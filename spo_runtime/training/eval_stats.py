"""The statistics of an evaluation report, in the standard library only (no scipy):

- `mean_ci`: the mean of a score and its two-sided Student-t confidence interval;
- `sign_test`: the paired sign test of one entry against another, ties dropped, with the exact binomial
  two-sided p-value (binomial coefficients in exact integers) and the Wilson score interval of the win rate.

Ties: pairs whose scores are equal (identical images score equally) carry no sign, so they are dropped, and
the win rate is wins / (wins + losses); with only ties it is 0.5, its interval [0, 1] and p = 1.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

__all__ = ["ALPHA", "binomial_two_sided_p", "mean_ci", "sign_test", "t_quantile", "wilson_interval"]

ALPHA = 0.05  # the significance level of `significant` and `beats_default`, and 1 - the intervals' level


def _t_abs_cdf(theta: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (integer) degrees of freedom, at t = sqrt(df) tan(theta): the finite
    series of Abramowitz and Stegun 26.7.3 (odd df) and 26.7.4 (even df)."""
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if df % 2:  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * c * total)
    term, total = 1.0, 1.0  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| < t) = `level` for `df` >= 1 degrees of freedom (e.g. level 0.95, df 4: 2.776), by
    bisection on the angle, where the distribution function is bounded and monotonic."""
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"level must be in (0, 1) and df >= 1, got {level}, {df}")
    lo, hi = 0.0, math.pi / 2
    for _ in range(60):  # the angle to 2^-60 of pi/2: far below a float t's resolution
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_abs_cdf(mid, df) < level else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def mean_ci(values: Sequence[float], level: float = 1 - ALPHA) -> dict:
    """{"n", "mean", "std" (sample, n - 1), "ci95": [lo, hi]}: mean +- t(level, n - 1) std / sqrt(n). One value
    has no interval (std and ci95 None)."""
    n = len(values)
    if n == 0:
        raise ValueError("values: need at least one")
    mean = math.fsum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def binomial_two_sided_p(wins: int, losses: int) -> float:
    """The exact two-sided p-value of `wins` against `losses` under p = 1/2: 2 P(X <= min(wins, losses)) for
    X ~ Binomial(wins + losses, 1/2), at most 1; 1 without pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0); C(n, k) = C(n, k - 1) (n - k + 1) / k, exactly, in integers
    for k in range(1, min(wins, losses) + 1):
        term = term * (n - k + 1) // k
        tail += term
    return min(1.0, 2 * tail / 2**n)  # exact integers; one rounding in the division


def wilson_interval(wins: int, n: int, level: float = 1 - ALPHA) -> list[float]:
    """The Wilson score interval of the proportion wins / n; [0, 1] for n = 0."""
    if n == 0:
        return [0.0, 1.0]
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = wins / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, center - half), min(1.0, center + half)]


def sign_test(scores: Sequence[float], reference: Sequence[float]) -> dict:
    """Pair i compares scores[i] with reference[i] (the same prompt and seed): a win when higher, a loss when
    lower, a tie when equal (dropped). {"wins", "losses", "ties", "win_rate" (over non-ties; 0.5 when all
    tie), "win_rate_ci95" (Wilson), "p_value" (exact two-sided binomial), "significant" (p < ALPHA and more
    wins than losses)}."""
    if len(scores) != len(reference):
        raise ValueError(f"scores: {len(scores)} against {len(reference)} reference scores; pairs need both")
    wins = sum(a > b for a, b in zip(scores, reference))
    losses = sum(a < b for a, b in zip(scores, reference))
    n = wins + losses
    p = binomial_two_sided_p(wins, losses)
    return {"wins": wins, "losses": losses, "ties": len(scores) - n, "win_rate": wins / n if n else 0.5,
            "win_rate_ci95": wilson_interval(wins, n), "p_value": p, "significant": p < ALPHA and wins > losses}
