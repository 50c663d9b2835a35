"""pass@k (Chen et al. 2021, unbiased) and mean@k against hand-computed values."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from grpo_stream.eval.passk import mean_at_k, mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> float:
    """The share of the C(n, k) draws that contain a correct sample."""
    samples = [True] * c + [False] * (n - c)
    draws = list(combinations(range(n), k))
    return sum(any(samples[i] for i in d) for d in draws) / len(draws)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 0.25),  # pass@1 = c/n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 1, 4, 1.0),  # k = n: any correct sample is drawn
        (4, 0, 4, 0.0),  # k = n, all wrong
        (8, 8, 3, 1.0),  # all correct
        (8, 0, 3, 0.0),  # all wrong
        (6, 4, 3, 1.0),  # n - c < k: every draw holds a correct one
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_matches_binomials_for_large_n():
    n, c, k = 200, 7, 50
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_rejects_bad_counts():
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_means_over_prompts():
    counts = [(4, 0), (4, 1), (4, 4)]
    assert mean_at_k(counts) == pytest.approx((0 + 0.25 + 1) / 3)
    assert mean_pass_at_k(counts, 4) == pytest.approx(2 / 3)
    assert mean_pass_at_k(counts, 2) == pytest.approx((0 + 0.5 + 1) / 3)
