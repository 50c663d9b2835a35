"""`grpo-stream rm train | eval` on a tiny Llama and a tiny pairs file: held-out pairwise
accuracy rises well above chance, and the folder it writes loads in transformers with
the same scores training computed."""

from __future__ import annotations

import json
import random

import pytest
import torch

from grpo_stream.cli import main as cli_main
from grpo_stream.rm.pairs import load_pairs_jsonl, split_by_prompt
from grpo_stream.rm.train import (
    TrainSettings,
    load_reward_model,
    sequence_scores,
    train_reward_model,
)
from grpo_stream.tasks.reward_model import rm_input_ids

GOOD = ["Thank you, I am happy to help.", "Sure, glad to help you with that.",
        "Of course, here is a careful answer.", "Happy to help, thanks for asking."]  # fmt: skip
BAD = ["Go away.", "No.", "Not my problem.", "Whatever, figure it out yourself."]


def _pairs_file(path, n_prompts: int = 24, per_prompt: int = 2, seed: int = 0):
    rng = random.Random(seed)
    rows = [{"prompt": f"Question {i}: can you help me with task {i}?",
             "chosen": rng.choice(GOOD), "rejected": rng.choice(BAD)}
            for i in range(n_prompts) for _ in range(per_prompt)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_lifts_heldout_accuracy_above_chance(tiny_model_dir, tmp_path) -> None:
    pairs = load_pairs_jsonl(_pairs_file(tmp_path / "p.jsonl"))
    train, held = split_by_prompt(pairs, 0.25, seed=0)
    assert len(held) >= 8
    model, tok = load_reward_model(tiny_model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    s = TrainSettings(epochs=4, batch_pairs=8, lr=1e-3, max_len=128, seed=0, log_every=5)
    lines: list[str] = []
    report = train_reward_model(model, tok, train, held, s, log=lines.append)
    assert report.heldout_accuracy_before < 0.75  # the untrained head: about chance
    assert report.heldout_accuracy >= 0.9, report
    assert report.history[-1]["loss"] < report.history[0]["loss"]
    assert report.steps == 4 * -(-len(train) // 8) and lines[-1].startswith("[rm] epoch 4/4")


def test_cli_writes_a_folder_transformers_loads_with_the_same_scores(
    tiny_model_dir, tmp_path, capsys
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pairs = _pairs_file(tmp_path / "p.jsonl")
    out = tmp_path / "rm"
    args = ["rm", "train", "--pairs", str(pairs), "--base", str(tiny_model_dir), "--out",
            str(out), "--epochs", "3", "--lr", "1e-3", "--max-len", "128", "--heldout", "0.25"]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr()
    assert "held-out pairwise accuracy" in printed.out and "[rm] epoch 3/3" in printed.err
    metrics = json.loads((out / "rm_metrics.json").read_text())
    assert metrics["heldout_accuracy"] >= 0.9 and metrics["pairs_heldout"] > 0

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    messages = [{"role": "user", "content": "Question 99: help?"},
                {"role": "assistant", "content": GOOD[0]}]  # fmt: skip
    ids = rm_input_ids(tok, messages)
    with torch.no_grad():
        hf = [model(input_ids=torch.tensor([x])).logits[0, 0] for x in (ids, ids[:5])]
        ours = sequence_scores(model, [ids, ids[:5]], tok.pad_token_id)  # [2], row 1 padded
    torch.testing.assert_close(torch.stack(hf), ours, atol=1e-5, rtol=1e-5)

    result = tmp_path / "acc.json"
    args = ["rm", "eval", "--model", str(out), "--pairs", str(pairs), "--json", str(result)]
    assert cli_main(args) == 0
    assert json.loads(result.read_text())["accuracy"] >= 0.9


def test_rm_eval_refuses_a_causal_lm(tiny_model_dir, tmp_path, capsys) -> None:
    pairs = _pairs_file(tmp_path / "p.jsonl", n_prompts=2)
    code = cli_main(["rm", "eval", "--model", str(tiny_model_dir), "--pairs", str(pairs)])
    assert code == 2
    assert "not a *ForSequenceClassification" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["missing.jsonl"])
def test_rm_train_names_a_missing_pairs_file(tmp_path, capsys, bad) -> None:
    code = cli_main(["rm", "train", "--pairs", str(tmp_path / bad), "--out", str(tmp_path / "o")])
    assert code == 2 and f"{bad}: pairs file not found" in capsys.readouterr().err
