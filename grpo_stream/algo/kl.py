"""Per-token KL estimators from log-probs of sampled tokens (Schulman's k1, k2, k3).

Each estimates KL(pi_theta || pi_ref) per token, for tokens y sampled from pi_theta, from
the ratio r = pi_ref(y) / pi_theta(y) and x = log r:

* ``k1`` = -x = -log r              unbiased, high variance, can be < 0
* ``k2`` = x^2 / 2                  low variance, biased
* ``k3`` = r - log r - 1 = e^x - x - 1  unbiased (E[r] = 1 under pi_theta) and always >= 0
                                    (DeepSeekMath's choice)

    kl = KL_ESTIMATORS[cfg.kl_estimator](logprobs, ref_logprobs)  # [B, T]

The learner's tokens come from vLLM's behaviour policy pi_b, pi_theta up to staleness
and the epochs' updates, so the estimate is approximate there. In general
`kl_kN(logp, other)` estimates KL(p || other) for tokens sampled from p (pass the
sampled policy's log-probs first): the loss also logs KL(pi_old || pi_theta) and
KL(pi_b || pi_old) this way. x is clamped to +-20 before the exponential so a wild
padding value or a far-off reference gives a large finite number, not inf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MAX_LOG_RATIO = 20.0


def _log_ratio(logp: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return (other - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [B, T] log(other/p)


def kl_k1(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return -_log_ratio(logp, ref)  # [B, T]


def kl_k2(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return 0.5 * _log_ratio(logp, ref).square()  # [B, T]


def kl_k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    x = _log_ratio(logp, ref)  # [B, T]
    return torch.expm1(x) - x  # [B, T] exp(x) - 1 - x, accurate near x = 0


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}
