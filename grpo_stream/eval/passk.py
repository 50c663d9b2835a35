"""pass@k and mean@k from per-prompt counts of correct samples (pure functions).

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
Trained on Code", eq. 1): with n samples of which c are correct, the chance that at
least one of k samples drawn without replacement is correct,
`1 - C(n-c, k) / C(n, k)`, computed as a stable product. mean@k is the mean fraction
correct (the sampled estimate of pass@1).

    pass_at_k(n=4, c=1, k=2)  # 0.5
"""

from __future__ import annotations


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples out of n is correct | c of the n are correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean of pass@k over prompts given as (n, c) pairs."""
    if not counts:
        raise ValueError("mean_pass_at_k: no prompts")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def mean_at_k(counts: list[tuple[int, int]]) -> float:
    """Mean over prompts of the fraction of their samples that are correct."""
    if not counts:
        raise ValueError("mean_at_k: no prompts")
    return sum(c / n for n, c in counts) / len(counts)
