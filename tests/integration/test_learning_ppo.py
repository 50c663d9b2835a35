"""PPO with a critic learns in the real pipeline: `grpo-stream run` on the CPU default
(SmolLM2-135M, stock vLLM CPU server) with `loss.advantage = "gae"` (a value model
initialised from the policy, GAE, whitened advantages) raises the reward, and its rows
carry the critic's metrics. Slow: as long as test_learning.py (~8 minutes here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_stream.core import metric_names as M

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
STEPS = 8


def test_ppo_with_a_critic_raises_the_reward(tmp_path, smollm2_dir):
    out = subprocess.run(
        [sys.executable, "-m", "grpo_stream.cli", "run", "--config",
         str(ROOT / "configs" / "cpu.toml"), f"run.output_dir={tmp_path}",
         f"learner.max_steps={STEPS}", "server.port=8071", "eval.every=0",
         "loss.advantage=gae", "critic.lr=1e-4", "critic.lam=0.95"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = sum(r["reward_mean"] for r in rows[:2]) / 2
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.15, [round(r["reward_mean"], 3) for r in rows]
    assert all(r[M.VALUE_LOSS] > 0 for r in rows)
    assert rows[-1][M.VALUE_MEAN] > 0.05  # the critic learned that rewards are positive
    models = json.loads((run_dir / "models.json").read_text())
    assert set(models) == {"actor", "critic"}
    assert (run_dir / "checkpoints" / f"step-{STEPS}" / "critic" / "config.json").is_file()
