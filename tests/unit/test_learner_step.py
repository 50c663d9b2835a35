"""The learner's μ-epoch step on a tiny Llama: parameters move, micro-batching does not
change the update, and epoch 2's ratio against pi_old is the first step's move, computed
here independently from the log-probs before and after it."""

from __future__ import annotations

import pytest
import torch
from learner_helpers import OwnProximalPassRunner, step_setup

from grpo_stream.learner.step import StepRunner


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_parameters_change_after_one_step(tiny_model_dir):
    _, model, runner, samples, advs = step_setup(tiny_model_dir)
    before = _params(model)
    m = runner.run(samples, advs)
    after = _params(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), set(before) - set(changed)
    assert m["clip_low_frac"] == 0 and m["clip_high_frac"] == 0


def test_epoch_two_ratio_equals_the_first_step_move(tiny_model_dir):
    """Epoch 2 clips pi_theta (after the first AdamW step) against pi_old (the starting
    weights). Both log-probs are computed here independently, with the padded layout, on
    a second copy that takes the same first step (epochs = 1): epoch 2's per-token ratio
    is exp(lp1 - lp0), its KL(pi_old || pi_theta) estimate exp(d) - 1 - d (k3, d = lp1 -
    lp0). The step's ratio_mean averages epoch 1 (exactly 1) and epoch 2 over the same
    tokens. Fails if pi_old were refreshed per epoch, taken after the step, or inverted."""
    from grpo_stream.learner.batch import collate
    from grpo_stream.learner.policy import sequence_logprobs

    _, _, runner, samples, advs = step_setup(tiny_model_dir, epochs=2, lr=1e-2)
    _, copy, runner1, samples1, advs1 = step_setup(tiny_model_dir, epochs=1, lr=1e-2)
    mb = collate(samples, advs, list(range(len(samples))), pad_id=0)
    with torch.no_grad():
        lp0 = sequence_logprobs(copy, mb, 1.0, 1024)[0][mb.mask > 0]  # [N tokens]
    runner1.run(samples1, advs1)  # the first optimizer step
    with torch.no_grad():
        lp1 = sequence_logprobs(copy, mb, 1.0, 1024)[0][mb.mask > 0]  # [N tokens]
    d = (lp1 - lp0).double()  # [N tokens]
    ratio2, kl2 = float(d.exp().mean()), float((d.exp() - 1 - d).mean())
    assert abs(ratio2 - 1) > 1e-3 and abs(ratio2 - float((-d).exp().mean())) > 1e-4
    m = runner.run(samples, advs)
    assert m["ratio_mean"] == pytest.approx((1.0 + ratio2) / 2, rel=1e-5)
    assert m["approx_kl_proximal/epoch2"] == pytest.approx(kl2, rel=1e-3)
    assert m["approx_kl_proximal"] == pytest.approx(kl2 / 2, rel=1e-3)


def test_micro_batch_split_gives_the_same_update(tiny_model_dir):
    results = []
    for mbs in (8, 3):
        _, model, runner, samples, advs = step_setup(tiny_model_dir, micro_batch_size=mbs)
        m = runner.run(samples, advs)
        results.append((_params(model), m))
    (p1, m1), (p2, m2) = results
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], atol=2e-6, rtol=1e-5)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)


def test_second_epoch_sees_a_ratio_away_from_one(tiny_model_dir):
    _, _, runner, samples, advs = step_setup(tiny_model_dir, epochs=2, lr=1e-2)
    m = runner.run(samples, advs)
    assert m["ratio_max"] > 1.0 + 1e-3 or m["ratio_min"] < 1.0 - 1e-3


@pytest.mark.parametrize("chunk", [1024, 7])
def test_fused_loss_gives_the_same_update_as_log_probs_then_loss(tiny_model_dir, chunk):
    """Two epochs (ratios off 1, clipping live) with and without the fused output layer;
    chunk 7 < T puts one sequence in each chunk."""
    results = []
    for fused in (False, True):
        _, model, runner, samples, advs = step_setup(
            tiny_model_dir, epochs=2, lr=1e-2, fused_loss=fused, logprob_chunk_size=chunk
        )
        runner.cfg.generator.temperature = runner.temperature = 0.7
        m = runner.run(samples, advs)
        results.append((_params(model), m))
    (p1, m1), (p2, m2) = results
    for k in p1:  # AdamW turns summation-order noise in ~0 gradients into ~1e-5 steps
        torch.testing.assert_close(p1[k], p2[k], atol=5e-5, rtol=1e-4)
    for k in ("loss", "grad_norm", "ratio_max", "clip_high_frac", "entropy", "pg_loss"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-7), k
    assert m1["ratio_max"] != 1.0


def test_metric_mean_extremes_loss_sum_and_non_finite():
    from grpo_stream.learner.step import MetricMean

    meter = MetricMean()
    meter.add({"loss": 0.25, "ratio_min": 0.9, "ratio_max": 1.1, "entropy": 2.0}, 10)
    meter.add({"loss": 0.5, "ratio_min": 0.8, "ratio_max": 1.05, "entropy": 5.0}, 30)
    meter.end_step()  # one optimizer batch: loss 0.75
    meter.add({"loss": 0.25, "ratio_min": float("nan"), "ratio_max": 1.3, "entropy": 1.0}, 20)
    meter.end_step()  # a second: loss 0.25
    out = meter.result()
    assert out["loss"] == pytest.approx((0.75 + 0.25) / 2)
    assert out["ratio_min"] == 0.8 and out["ratio_max"] == 1.3  # extremes, not means
    assert out["entropy"] == pytest.approx((2.0 * 10 + 5.0 * 30 + 1.0 * 20) / 60)


def _run_counting_forwards(tiny_model_dir, own_pass: bool, **learner):
    runner_cls = OwnProximalPassRunner if own_pass else StepRunner
    _, model, runner, samples, advs = step_setup(tiny_model_dir, runner_cls, lr=1e-2, **learner)
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    m = runner.run(samples, advs)
    return _params(model), m, calls


@pytest.mark.parametrize("fused", [True, False])
def test_epoch_one_forward_serves_as_the_proximal_pass(tiny_model_dir, fused):
    """One optimizer step per epoch: pi_old is epoch 1's own forward, detached (the weights
    have not moved yet), so no no-grad pass runs first; the update is the one the separate
    pass gives, and later epochs still clip against it (not against themselves)."""
    kw = dict(epochs=3, micro_batch_size=3, fused_loss=fused, shared_prefix=False)  # 3, 3, 2
    p_own, m_own, calls_own = _run_counting_forwards(tiny_model_dir, True, **kw)
    p_reuse, m_reuse, calls_reuse = _run_counting_forwards(tiny_model_dir, False, **kw)
    assert calls_own == [False] * 3 + [True] * 9  # the no-grad pass, then 3 epochs x 3
    assert calls_reuse == [True] * 9
    assert m_own["clip_frac/epoch3"] > 0.05 and m_own["approx_kl_proximal/epoch3"] > 1e-4
    for k in ("loss", "grad_norm", "clip_frac/epoch2", "clip_frac/epoch3", "ratio_max"):
        assert m_reuse[k] == pytest.approx(m_own[k], rel=1e-6, abs=1e-9), k
    for k in p_own:
        torch.testing.assert_close(p_reuse[k], p_own[k], atol=1e-6, rtol=1e-6)


def test_two_optimizer_steps_per_epoch_keep_the_proximal_pass(tiny_model_dir):
    """The second minibatch's epoch-1 forward runs after an optimizer step, so pi_old
    needs its own pass at the batch's starting weights."""
    _, m, calls = _run_counting_forwards(
        tiny_model_dir, False, epochs=1, micro_batch_size=4, minibatches_per_epoch=2,
        shared_prefix=False,
    )  # fmt: skip
    assert calls == [False, False, True, True]
    assert m["ratio_max"] > 1.0 + 1e-4  # the second minibatch moved away from pi_old
