"""configs/sweeps/four_models.toml: 4 settings x 2 seeds on one samples budget, each
setting holding exactly its models (PPO: actor, critic, reference, reward model; GRPO:
no critic; GRPO with rules: no reward model; lean GRPO: the actor alone), every held-out
pass@1 scored by the rule."""

from __future__ import annotations

from pathlib import Path

from grpo_stream.analysis.sweep import expand, load_sweep, point_config
from grpo_stream.learner.critic import needs_reference, uses_critic

SWEEP = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "four_models.toml"


def _models(cfg) -> set[str]:
    held = {"actor"}
    held |= {"critic"} if uses_critic(cfg) else set()
    held |= {"reference"} if needs_reference(cfg) else set()
    held |= (
        {"reward_model"} if any(f.name == "reward_model" for f in cfg.reward.functions) else set()
    )
    return held


def test_four_settings_two_seeds_one_budget_their_models():
    sw = load_sweep(SWEEP)
    points = expand(sw)
    assert len(points) == 8
    by_setting: dict[str, set] = {}
    for pt in points:
        cfg = point_config(sw, pt)
        held = _models(cfg)
        assert by_setting.setdefault(pt.choice["setting"], held) == held
        assert pt.budget == ["learner.max_steps=5"]  # 160 samples / (4 groups x 8)
        assert [f.name for f in cfg.eval.reward.functions] == ["numeric_answer"]
    assert by_setting == {
        "ppo": {"actor", "critic", "reference", "reward_model"},
        "grpo_rm": {"actor", "reference", "reward_model"},
        "grpo_rule": {"actor", "reference"},
        "lean": {"actor"},
    }
    assert sorted(pt.choice["run.seed"] for pt in points) == [0, 0, 0, 0, 1, 1, 1, 1]
