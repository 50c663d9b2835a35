"""The reward-model reward without a server: the loss and pair mining by hand, the pairs
file, the config, rendering, the launcher's argv, the classifier check, and the
failures (a refused server, a wrong answer shape) that become failed rewards."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from conftest import free_port

from grpo_stream.algo.bradley_terry import bradley_terry_loss, pairwise_accuracy
from grpo_stream.config import Config, ConfigError, RewardConfig, RewardFunctionConfig
from grpo_stream.rm.pairs import (
    PairsError,
    load_pairs_jsonl,
    mine_group_pairs,
    split_by_prompt,
)
from grpo_stream.serving.client import ServerResponseError, VLLMClient, parse_classify
from grpo_stream.tasks import Prompt, RewardRunner
from grpo_stream.tasks.reward_model import rm_input_ids, rm_messages, strip_duplicate_bos

PROMPT = Prompt("p0", "What is 2+3? Reply with only the number.", "5")


def test_bradley_terry_loss_by_hand() -> None:
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0])
    loss, m = bradley_terry_loss(chosen, rejected)
    # margins 2 and -1: (log(1+e^-2) + log(1+e^1)) / 2
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx(0.5)
    loss.backward()
    # d/dc of -log σ(c - r) / P = -(1 - σ(margin)) / 2
    sig = torch.sigmoid(torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(chosen.grad, -(1 - sig) / 2)
    assert pairwise_accuracy([1.0, 0.0, 2.0], [0.0, 0.0, 3.0]) == pytest.approx(1 / 3)  # tie: wrong
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_pairs_are_mined_within_a_group_widest_gap_first() -> None:
    rewards = [1.0, 0.0, 0.5, math.nan, 1.0]
    assert mine_group_pairs(rewards) == [(0, 1), (4, 1), (0, 2), (2, 1), (4, 2)]
    assert mine_group_pairs(rewards, max_pairs=3) == [(0, 1), (4, 1), (0, 2)]
    assert mine_group_pairs(rewards, min_margin=0.5) == [(0, 1), (4, 1)]
    assert mine_group_pairs([0.3, 0.3, math.nan]) == []  # equal rewards: no preference


def _write_pairs(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pairs_file_text_and_messages_and_errors(tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    msgs = [{"role": "user", "content": "hi"}]
    _write_pairs(f, [{"prompt": "q1", "chosen": "a", "rejected": "b"},
                     {"prompt": msgs, "chosen": [{"role": "assistant", "content": "x"}],
                      "rejected": "y"}])  # fmt: skip
    a, b = load_pairs_jsonl(f)
    assert a.prompt == [{"role": "user", "content": "q1"}]
    assert a.chosen == [{"role": "assistant", "content": "a"}]
    assert b.prompt == msgs and b.rejected == [{"role": "assistant", "content": "y"}]
    _write_pairs(f, [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": 3}])
    with pytest.raises(PairsError, match=r"p.jsonl:2: missing field 'rejected'"):
        load_pairs_jsonl(f)
    _write_pairs(f, [{"prompt": "q", "chosen": 3, "rejected": "b"}])
    with pytest.raises(PairsError, match=r"p.jsonl:1: chosen: expected a string"):
        load_pairs_jsonl(f)


def test_split_keeps_each_prompt_on_one_side(tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    _write_pairs(f, [{"prompt": f"q{i % 10}", "chosen": "a", "rejected": str(i)}
                     for i in range(40)])  # fmt: skip
    pairs = load_pairs_jsonl(f)
    train, held = split_by_prompt(pairs, 0.3, seed=1)
    assert train and held and len(train) + len(held) == 40
    assert not {p.prompt_key for p in train} & {p.prompt_key for p in held}
    assert split_by_prompt(pairs, 0.3, seed=1) == (train, held)  # deterministic
    two = [p for p in pairs if p.prompt_key in {pairs[0].prompt_key, pairs[1].prompt_key}]
    t2, h2 = split_by_prompt(two, 0.01)
    assert t2 and h2  # two prompts and a fraction > 0: one on each side


def test_reward_model_config_needs_a_path() -> None:
    cfg = {"reward": {"functions": [{"name": "reward_model"}]}}
    with pytest.raises(ValueError, match="reward_model.path"):
        Config.model_validate(cfg)
    ok = Config.model_validate({**cfg, "reward_model": {"path": "x", "port": 9100}})
    assert ok.reward_model.resolved_urls("0.0.0.0") == ["http://127.0.0.1:9100"]


def test_duplicate_bos_is_stripped_once_and_rendering_uses_the_template(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    assert strip_duplicate_bos([1, 1, 5, 1], 1) == [1, 5, 1]
    assert strip_duplicate_bos([1, 1, 1, 5], 1) == [1, 5]
    assert strip_duplicate_bos([1, 5], None) == [1, 5]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = rm_messages([{"role": "user", "content": "What is 2+3?"}], "5")
    ids = rm_input_ids(tok, messages)
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n5<|im_end|>\n")
    assert ids == tok(text, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_classify_answers_are_checked() -> None:
    body = {"data": [{"index": 1, "probs": [-3.5]}, {"index": 0, "probs": [2.0]}]}
    assert parse_classify(body, 2, "u") == [2.0, -3.5]  # ordered by index
    with pytest.raises(ServerResponseError, match="exactly one label"):
        parse_classify({"data": [{"index": 0, "probs": [0.1, 0.9]}]}, 1, "u")
    with pytest.raises(ServerResponseError, match="expected 2 items"):
        parse_classify({"data": [{"index": 0, "probs": [1.0]}]}, 2, "u")


def test_launcher_uses_the_pooling_runner_and_refuses_a_causal_lm(tiny_model_dir, tmp_path):
    from grpo_stream.serving.rm_server import check_classifier, make_rm_servers

    cfg = Config.model_validate({"reward_model": {"path": str(tiny_model_dir), "port": 9200}})
    with pytest.raises(ConfigError, match="LlamaForCausalLM, not a \\*ForSequenceClassification"):
        make_rm_servers(cfg, tmp_path)
    two = tmp_path / "two"
    two.mkdir()
    config = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}
    (two / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has 2 labels"):
        check_classifier(str(two))
    one = tmp_path / "one"
    one.mkdir()
    (one / "config.json").write_text(json.dumps({**config, "id2label": {"0": "LABEL_0"}}))
    cfg.reward_model.path = str(one)
    (server,) = make_rm_servers(cfg, tmp_path)
    cmd = server.command
    assert cmd[cmd.index("--runner") + 1] == "pooling"
    assert cmd[cmd.index("--convert") + 1] == "classify"
    assert cmd[cmd.index("--port") + 1] == "9200" and "--logprobs-mode" not in cmd
    assert server.url == "http://127.0.0.1:9200"


def _rm_cfg(port: int, **rm) -> Config:
    return Config.model_validate({
        "reward": {"functions": [{"name": "numeric_answer", "weight": 1.0},
                                 {"name": "reward_model", "weight": 0.5}]},
        "reward_model": {"path": "unused", "port": port, **rm},
    })  # fmt: skip


def test_a_dead_reward_server_fails_the_rewards_with_its_reason(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    from grpo_stream.generator.reward_model import reward_model_scorers

    port = free_port()  # nothing listens there
    cfg = _rm_cfg(port, retries=2, timeout_s=20)
    scorers = reward_model_scorers(cfg, AutoTokenizer.from_pretrained(smollm2_dir))

    async def main():
        async with VLLMClient(timeout_s=5) as client:
            scorers["reward_model"].bind(client)
            runner = RewardRunner(cfg.reward, external=scorers)
            return await runner.score_group(PROMPT, ["5", "6"])

    results = asyncio.run(main())
    assert scorers["reward_model"].requests == 3  # 1 + 2 retries
    for r in results:
        assert r.failed and math.isnan(r.total)
        assert r.error.startswith("reward_model: failed within 20s (3 tries):")
        assert f"127.0.0.1:{port}/classify" in r.error
    assert [r.components["numeric_answer"] for r in results] == [1.0, 0.0]  # rules still scored


def test_without_a_scorer_the_reward_model_fails_with_a_reason() -> None:
    cfg = RewardConfig(functions=[RewardFunctionConfig(name="reward_model")])

    async def main():
        async with RewardRunner(cfg) as runner:
            return await runner.score_group(PROMPT, ["5"])

    (r,) = asyncio.run(main())
    assert r.failed and "has no reward-model client" in r.error


def test_doctor_refuses_a_causal_lm_and_probes_external_servers(tiny_model_dir, tmp_path):
    from grpo_stream.run.doctor import PreflightError, preflight, run_checks

    assert all(not c.name.startswith("reward_model") for c in run_checks(Config()))
    cfg = _rm_cfg(9300)
    cfg.reward_model.path = str(tiny_model_dir)
    with pytest.raises(PreflightError, match="LlamaForCausalLM, not a"):
        preflight(cfg, "generate")
    one = tmp_path / "one"
    one.mkdir()
    arch = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    (one / "config.json").write_text(json.dumps(arch))
    port = free_port()
    cfg.reward_model.path, cfg.reward_model.urls = str(one), [f"http://127.0.0.1:{port}"]
    path_check, url_check = [c for c in run_checks(cfg) if c.name.startswith("reward_model")]
    assert path_check.ok and "one label" in path_check.detail
    assert not url_check.ok and f"127.0.0.1:{port}/classify" in url_check.detail
