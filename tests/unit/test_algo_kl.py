"""The KL estimators and the direction every document states for them.

`kl_kN(logp, ref)` on tokens sampled from p estimates KL(p || ref): k1 and k3 exactly in
expectation. Checked by summing over a small vocabulary with the sampling probabilities,
where KL(p || ref) and KL(ref || p) differ by far more than the tolerance."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from grpo_stream.algo.kl import kl_k1, kl_k3

ROOT = Path(__file__).resolve().parents[2]
THETA = torch.tensor([0.70, 0.20, 0.05, 0.05], dtype=torch.float64)  # pi_theta over 4 tokens
REF = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)  # pi_ref


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


@pytest.mark.parametrize("estimator", [kl_k1, kl_k3])
def test_expectation_under_pi_theta_is_kl_theta_to_ref(estimator):
    per_token = estimator(THETA.log()[None], REF.log()[None])[0]  # [V], one token each
    expectation = float((THETA * per_token).sum())  # E_{y ~ pi_theta}
    forward, reverse = _kl(THETA, REF), _kl(REF, THETA)
    # 0.7 ln 2.8 + 0.2 ln 0.8 + 0.1 ln 0.2;  0.25 (ln(1/2.8) + ln 1.25 + 2 ln 5)
    assert forward == pytest.approx(0.515161, abs=1e-6)
    assert reverse == pytest.approx(0.603100, abs=1e-6)
    assert expectation == pytest.approx(forward, rel=1e-9)


def test_k3_is_r_minus_log_r_minus_one():
    r = REF / THETA  # pi_ref / pi_theta
    torch.testing.assert_close(kl_k3(THETA.log()[None], REF.log()[None])[0], r - r.log() - 1)


# KL(pi_ref || ...) written anywhere: the reverse of what the loss estimates
REVERSED = re.compile(r"KL\w*\(\s*(?:π_ref|pi_ref)\s*(?:‖|\|\|)")
FORWARD = re.compile(r"KL\(\s*(?:π_θ|pi_theta)\s*(?:‖|\|\|)\s*(?:π_ref|pi_ref)\s*\)")
STATED_IN = ["README.md", "grpo_stream/algo/kl.py", "grpo_stream/algo/loss.py",
             "grpo_stream/core/metric_names.py", "grpo_stream/config/learning.py"]  # fmt: skip


def test_every_statement_of_the_reference_kl_has_one_direction():
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("grpo_stream/**/*.py")]
    reversed_ = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files
                 for m in REVERSED.finditer(p.read_text())]  # fmt: skip
    assert reversed_ == []
    missing = [f for f in STATED_IN if not FORWARD.search((ROOT / f).read_text())]
    assert missing == [], "no KL(π_θ‖π_ref) / KL(pi_theta || pi_ref) statement"
