"""bench/simulate.py (a SIMULATION driving the real generator, gate, buffer and learner
batch logic): at 1 server in sync mode it reproduces what `run --sync` does on real
parts (tests/integration/test_sync_mode.py: 3 steps of 2 groups of 4, each batch at the
version the step before published, staleness 0, nothing dropped), exactly; and an async
point runs ahead within its bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.simulate import SimParams, point_config, simulate_point

FAST = SimParams(len_mu=3.0, len_sigma=0.5, max_tokens=64, tpot_s=0.01, prefill_s=0.1,
                 train_s_per_token=1e-3, sync_s=0.2, scale=0.05)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> str:
    return str(tiny_model_dir)


def test_one_server_sync_reproduces_sync_modes_counts(model_dir: str, tmp_path: Path) -> None:
    cfg = point_config(str(tmp_path), 1, None, 3, FAST, batch_groups=2, group_size=4)
    assert cfg.generator.max_ahead_batches == 0 and cfg.learner.max_staleness == 0
    o = simulate_point(cfg, FAST, model_dir)
    assert o.steps == 3
    assert o.samples == 3 * 2 * 4
    # as the real run's buffer; after the last sync, as in the real run, the generator
    # may start one more batch before the learner's finish reaches it
    assert o.buffer_versions[:6] == [0, 0, 1, 1, 2, 2]
    assert o.buffer_versions[6:] in ([], [3, 3])
    assert o.stale_dropped == 0
    assert set(o.staleness) == {0}


def test_async_point_runs_ahead_within_its_bound(model_dir: str, tmp_path: Path) -> None:
    cfg = point_config(str(tmp_path), 2, 1, 4, FAST, batch_groups=2, group_size=4)
    o = simulate_point(cfg, FAST, model_dir)
    assert o.steps == 4 and o.samples == 4 * 2 * 4
    assert max(o.staleness) <= 1 and o.stale_dropped == 0
    assert max(o.buffer_versions[:4]) == 0  # two batches generated before the first sync
