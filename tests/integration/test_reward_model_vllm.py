"""Integration: the `reward_model` reward against a real vLLM CPU pooling server.

One server per module (`grpo_stream.serving.rm_server`, `--runner pooling`) on a tiny
LlamaForSequenceClassification whose score head is set so two inputs have logits 4 and
-3: outside [0, 1], so a sigmoid (vLLM's default for one label) would show. Checked: the
scores the generator's scorer gets equal transformers' logits on the same token ids,
computed independently; the raw logit reaches the advantage; a dead server fails the
group's rewards with reasons; a restarted one scores again.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
from conftest import free_port

from grpo_stream.algo.advantages import compute_advantages
from grpo_stream.config import Config, LossConfig
from grpo_stream.generator.reward_model import reward_model_scorers
from grpo_stream.rm.train import TrainReport, load_reward_model, save_reward_model
from grpo_stream.serving.client import VLLMClient
from grpo_stream.serving.rm_server import launch_rm_servers, make_rm_servers
from grpo_stream.tasks import Prompt, RewardRunner

pytestmark = pytest.mark.slow

PROMPT = Prompt("p0", "What is 2+3? Reply with only the number.", "5")
FITTED = ["5", "Thank you, it is six."]  # their logits are set to TARGETS
TARGETS = [4.0, -3.0]
OTHER = "I think the answer is 5."


def _build_classifier(base: Path, out: Path, cfg: Config) -> Path:
    """A one-label classifier from the tiny Llama, its head solved so FITTED score TARGETS."""
    model, tok = load_reward_model(base)
    (scorer,) = reward_model_scorers(cfg, tok).values()
    seqs = [scorer.input_ids(PROMPT, c) for c in FITTED]
    with torch.no_grad():
        h = torch.stack(
            [model.base_model(input_ids=torch.tensor([s])).last_hidden_state[0, -1] for s in seqs]
        )  # [2, H]
        y = torch.tensor(TARGETS)  # [2]
        w = h.T @ torch.linalg.solve(h @ h.T, y)  # [H]: the least-norm w with h @ w = y
        model.score.weight.copy_(w[None, :])  # [1, H]
    return save_reward_model(model, tok, out, TrainReport())


@pytest.fixture(scope="module")
def rm_setup(tiny_model_dir: Path, module_tmp: Path):
    cfg = Config.model_validate({
        "reward": {"functions": [{"name": "reward_model"}]},
        "reward_model": {"path": str(module_tmp / "rm"), "port": free_port(), "max_len": 256,
                         "retries": 1, "timeout_s": 30},
        "server": {"startup_timeout_s": 600},
    })  # fmt: skip
    _build_classifier(tiny_model_dir, module_tmp / "rm", cfg)
    servers = launch_rm_servers(cfg, module_tmp / "logs")
    try:
        yield cfg, servers
    finally:
        for s in servers:
            s.stop()


def _score(cfg: Config, completions: list[str]):
    scorers = reward_model_scorers(cfg)

    async def main():
        async with VLLMClient(timeout_s=30) as client:
            scorers["reward_model"].bind(client)
            runner = RewardRunner(cfg.reward, external=scorers)
            return await runner.score_group(PROMPT, completions)

    return asyncio.run(main()), scorers["reward_model"]


def _transformers_logits(folder: str, cfg: Config, completions: list[str]) -> list[float]:
    """The reference, computed apart from the project's training code: HF's own forward."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    (scorer,) = reward_model_scorers(cfg).values()
    with torch.no_grad():
        return [
            float(model(input_ids=torch.tensor([scorer.input_ids(PROMPT, c)])).logits[0, 0])
            for c in completions
        ]


def test_server_scores_equal_transformers_logits_not_their_sigmoid(rm_setup) -> None:
    cfg, _ = rm_setup
    completions = [*FITTED, OTHER]
    results, _ = _score(cfg, completions)
    served = [r.components["reward_model"] for r in results]
    assert not any(r.failed for r in results), [r.error for r in results]
    reference = _transformers_logits(cfg.reward_model.path, cfg, completions)
    torch.testing.assert_close(torch.tensor(served), torch.tensor(reference), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(served[:2]), torch.tensor(TARGETS), atol=2e-3, rtol=0)
    sigmoid = [1 / (1 + math.exp(-x)) for x in TARGETS]
    assert all(abs(s - g) > 0.9 for s, g in zip(served, sigmoid, strict=False))


def test_the_raw_logit_reaches_the_advantage(rm_setup) -> None:
    cfg, _ = rm_setup
    results, _ = _score(cfg, FITTED)
    totals = torch.tensor([[r.total for r in results]])  # [1, 2]
    adv, _, _ = compute_advantages(totals, LossConfig(scale_std=False))
    torch.testing.assert_close(adv, torch.tensor([[3.5, -3.5]]), atol=5e-3, rtol=0)  # 4 - 0.5


def test_a_dead_server_fails_the_rewards_then_a_restarted_one_scores(rm_setup, module_tmp):
    cfg, servers = rm_setup
    for s in servers:
        s.stop()
    results, scorer = _score(cfg, FITTED)
    assert scorer.requests == 2  # one try and one retry
    for r in results:
        assert r.failed and math.isnan(r.total)
        assert r.error.startswith("reward_model: failed within 30s (2 tries):")
        assert f":{cfg.reward_model.port}/classify" in r.error
    restarted = make_rm_servers(cfg, module_tmp / "logs2")
    servers[:] = restarted  # the fixture stops these
    for s in restarted:
        s.start().wait_healthy()
    results, _ = _score(cfg, FITTED)
    served = torch.tensor([r.components["reward_model"] for r in results])
    torch.testing.assert_close(served, torch.tensor(TARGETS), atol=2e-3, rtol=0)
