"""The critic beside the actor (loss.advantage = "gae") on the tiny Llama: one step trains
both and logs the critic's metrics; the critic's gradients stay in the critic; the actor's
loss depends on the critic only through the advantages; the critic's checkpoint round-trips
(weights and AdamW state); a reward model's head is kept as the value head."""

from __future__ import annotations

import random

import pytest
import torch

from bench.synth import make_groups
from grpo_stream.config import Config, ConfigError
from grpo_stream.core import metric_names as M
from grpo_stream.learner.critic import CRITIC_DIR, load_critic, load_value_model
from grpo_stream.learner.distributed import DistInfo
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.plan import plan_micro_batches
from grpo_stream.learner.policy import load_causal_lm
from grpo_stream.learner.step import StepRunner, batch_advantages

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _setup(tiny_model_dir, **critic):
    cfg = Config.model_validate({"loss": {"advantage": "gae"}, "critic": {"lr": 1e-3, **critic}})
    cfg.generator.temperature = 1.0
    cfg.learner.lr, cfg.learner.epochs, cfg.learner.micro_batch_size = 1e-3, 2, 4
    torch.manual_seed(0)
    random.seed(0)
    model = load_causal_lm(str(tiny_model_dir), torch.device("cpu"))
    opt, sched = build_optimizer(model, cfg.learner)
    runner = StepRunner(cfg, model, None, opt, sched, torch.device("cpu"), pad_id=0)
    runner.critic = load_critic(cfg, str(tiny_model_dir), CPU)
    groups = make_groups(2, group_size=4, prompt_len=6, completion_len=5)
    samples, rewards, _ = batch_advantages(groups, cfg)
    return cfg, runner, samples, rewards


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_one_gae_step_trains_actor_and_critic(tiny_model_dir):
    cfg, runner, samples, rewards = _setup(tiny_model_dir)
    assert rewards == [s.reward for s in samples]  # "gae" passes the raw rewards on
    actor0, critic0 = _params(runner.model), _params(runner.critic.model)
    assert all((p == 0).all() for p in runner.critic.model.score.parameters())  # fresh head
    row = runner.run(samples, rewards)
    assert row[M.VALUE_MEAN] == 0.0  # V_old of step 1: the zero head
    assert row[M.EXPLAINED_VARIANCE] == pytest.approx(0.0, abs=1e-9)  # V = 0 explains nothing
    assert row[M.VALUE_LOSS] > 0 and 0.0 <= row[M.VALUE_CLIP_FRAC] <= 1.0
    assert row[M.CRITIC_GRAD_NORM] > 0
    assert 0.3 < row[M.ADVANTAGE_ABS_MEAN] < 1.0  # whitened token advantages: std 1

    def moved(before, m) -> float:
        return max((p - before[n]).abs().max().item() for n, p in m.named_parameters())

    assert moved(actor0, runner.model) > 1e-4
    assert moved(critic0, runner.critic.model) > 1e-4
    assert runner.critic.model.score.weight.abs().max() > 0  # the head learned
    row2 = runner.run(samples, rewards)  # V_old now moved towards the returns
    assert row2[M.VALUE_MEAN] != 0.0 and row2[M.VALUE_LOSS] < row[M.VALUE_LOSS]


def _prepared(runner, samples, rewards):
    mbs = plan_micro_batches(samples, rewards, runner.cfg.learner, 0, runner.model)
    old, ref = runner._frozen_logprobs(mbs, own_pass=True)
    runner.critic.prepare(mbs, ref)
    n = float(sum(mb.num_tokens for mb in mbs))
    return mbs, old, {"total_tokens": n, "total_seqs": float(len(samples))}


def test_critic_gradients_reach_only_the_critic(tiny_model_dir):
    _, runner, samples, rewards = _setup(tiny_model_dir)
    mbs, old, totals = _prepared(runner, samples, rewards)
    assert mbs[0].advantages.shape == mbs[0].mask.shape  # per token after GAE
    loss, _, _ = runner._micro_batch_loss(mbs[0], old[0], None, totals)
    loss.backward()
    assert all(p.grad is None for p in runner.critic.model.parameters())
    actor_grads = {n: p.grad.clone() for n, p in runner.model.named_parameters()}
    runner.critic.train_micro_batch(0, mbs[0], totals["total_tokens"])
    for n, p in runner.model.named_parameters():  # the value loss adds nothing to the actor
        torch.testing.assert_close(p.grad, actor_grads[n], atol=0, rtol=0)
    assert runner.critic.model.score.weight.grad.abs().max() > 0


def test_actor_loss_sees_the_critic_only_through_advantages(tiny_model_dir):
    _, runner, samples, rewards = _setup(tiny_model_dir)
    mbs, old, totals = _prepared(runner, samples, rewards)
    before = runner._micro_batch_loss(mbs[0], old[0], None, totals)[0].item()
    with torch.no_grad():  # any critic, once the advantages are fixed
        for p in runner.critic.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert runner._micro_batch_loss(mbs[0], old[0], None, totals)[0].item() == before
    mbs2, _, _ = _prepared(runner, samples, rewards)  # new V_old: new advantages
    assert runner._micro_batch_loss(mbs2[0], old[0], None, totals)[0].item() != before


def test_critic_checkpoint_round_trips_weights_and_optimizer(tiny_model_dir, tmp_path):
    cfg, runner, samples, rewards = _setup(tiny_model_dir)
    runner.run(samples, rewards)
    runner.critic.writer()(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # only critic/ matters here
    back = load_critic(cfg, str(tiny_model_dir), CPU, ckpt=tmp_path)
    back.load_optimizer(tmp_path)
    for (n, p), q in zip(
        runner.critic.model.named_parameters(), back.model.parameters(), strict=True
    ):
        torch.testing.assert_close(q, p, atol=0, rtol=0, msg=n)
    s1, s2 = runner.critic.opt.state_dict()["state"], back.opt.state_dict()["state"]
    assert len(s1) == len(s2) > 0
    for k in s1:
        torch.testing.assert_close(s2[k]["exp_avg_sq"], s1[k]["exp_avg_sq"], atol=0, rtol=0)
    (tmp_path / CRITIC_DIR / "config.json").unlink()
    with pytest.raises(ConfigError, match="no critic/"):
        load_critic(cfg, str(tiny_model_dir), CPU, ckpt=tmp_path)


def test_a_reward_model_head_becomes_the_value_head(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    with torch.no_grad():
        rm.score.weight.normal_()
    rm.save_pretrained(tmp_path / "rm")
    critic = load_value_model(str(tmp_path / "rm"), torch.device("cpu"))
    torch.testing.assert_close(critic.score.weight, rm.score.weight, atol=0, rtol=0)
    assert (critic.score.bias == 0).all()  # the reward model has none: a zero bias
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():  # V at the last token = the reward model's score of the sequence
        v = critic(input_ids=ids).logits[0, -1, 0]
        torch.testing.assert_close(v, rm(input_ids=ids).logits[0, 0])
    cfg = Config.model_validate({"loss": {"advantage": "gae"}, "critic": {"init": str(tmp_path)}})
    with pytest.raises(ConfigError, match="critic.init"):
        load_critic(cfg, str(tiny_model_dir), CPU)


def test_a_critic_of_another_vocabulary_is_refused(tiny_model_dir, tiny_lm, tmp_path):
    tiny_lm.save_pretrained(tmp_path / "other")  # a 32-token vocabulary
    cfg = Config.model_validate(
        {"loss": {"advantage": "gae"}, "critic": {"init": str(tmp_path / "other")}}
    )
    with pytest.raises(ConfigError, match="vocabulary of 32 tokens, the policy"):
        load_critic(cfg, str(tiny_model_dir), CPU)
