"""`num_seqs` in a learner step's row is a count: the sequences the step trained on, each
counted once (not once per epoch, and not a token-weighted mean of micro-batch sizes)."""

from __future__ import annotations

import pytest
from learner_helpers import step_setup


@pytest.mark.parametrize("micro_batch_size", [8, 3])
def test_num_seqs_counts_the_steps_sequences(tiny_model_dir, micro_batch_size):
    # 2 groups of 4 = 8 samples; micro-batches of 3: sizes 3, 3, 2; 2 epochs
    _, _, runner, samples, advs = step_setup(
        tiny_model_dir, epochs=2, micro_batch_size=micro_batch_size, shared_prefix=False
    )
    assert len(samples) == 8
    m = runner.run(samples, advs)
    assert m["num_seqs"] == 8


def test_metric_mean_leaves_the_count_weights_out():
    from grpo_stream.learner.step import MetricMean

    meter = MetricMean()
    meter.add({"num_seqs": 3.0, "num_tokens": 30.0, "entropy": 1.0}, 30)
    meter.add({"num_seqs": 2.0, "num_tokens": 10.0, "entropy": 3.0}, 10)
    meter.end_step()
    out = meter.result()
    assert "num_seqs" not in out and "num_tokens" not in out  # (3*30 + 2*10) / 40 = 2.75 before
    assert out["entropy"] == pytest.approx((1.0 * 30 + 3.0 * 10) / 40)
