"""The [critic] section and loss.kl_in_reward act only with loss.advantage = "gae"."""

import pytest

from grpo_stream.config import Config, ConfigError, config_from_dict, load_run_config
from grpo_stream.config.rules import inapplicable


def test_critic_fields_refused_unless_gae():
    with pytest.raises(ConfigError, match=r"critic.lr applies only with loss.advantage = 'gae'"):
        config_from_dict({"critic": {"lr": 1e-4}})
    with pytest.raises(ConfigError, match=r"loss.kl_in_reward applies only with"):
        config_from_dict({"loss": {"kl_in_reward": 0.05}})
    cfg = config_from_dict(
        {"loss": {"advantage": "gae", "kl_in_reward": 0.05}, "critic": {"lr": 1e-4, "lam": 0.9}}
    )
    assert cfg.critic.lr == 1e-4 and cfg.critic.lam == 0.9 and cfg.loss.kl_in_reward == 0.05
    assert "critic.lr" not in inapplicable(cfg)
    assert {"critic.lr", "critic.init", "loss.kl_in_reward"} <= set(inapplicable(Config()))
    with pytest.raises(ConfigError, match=r"loss.scale_std applies only with"):
        config_from_dict({"loss": {"advantage": "gae", "scale_std": False}})


def test_a_gae_run_folder_read_back_with_group_drops_the_critic(tmp_path):
    cfg = config_from_dict({"loss": {"advantage": "gae"}, "critic": {"gamma": 0.99}})
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    assert load_run_config(tmp_path).critic.gamma == 0.99
    back = load_run_config(tmp_path, ["loss.advantage=group"])
    assert back.loss.advantage == "group" and back.critic.gamma == 1.0
    with pytest.raises(ConfigError, match="critic.gamma applies only with"):
        load_run_config(tmp_path, ["loss.advantage=group", "critic.gamma=0.9"])
