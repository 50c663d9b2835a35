"""The models table of `grpo-stream compare`: the models each run held (RUN/models.json,
written by the learner) with their parameter counts, the reward servers' peak memory
(RUN/reward_servers.json), beside peak learner memory, time per step, samples to the
threshold and the held-out pass@1; and the learner's own record of its models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_compare import make_run

from grpo_stream.analysis.compare import compare_runs
from grpo_stream.analysis.compare_table import models_table
from grpo_stream.config import Config
from grpo_stream.learner.models_info import (
    module_params,
    resident_models,
    safetensors_params,
    write_models,
)


def _models(rd: Path, **models) -> None:
    data = {k: {"where": "learner", "params": v} for k, v in models.items()}
    (rd / "models.json").write_text(json.dumps(data))


def test_models_table_per_setting(tmp_path):
    ppo = make_run(tmp_path, "ppo", 2, 0, [0.1, 0.5, 0.6], evals=[(3, 0.5)])
    lean = make_run(tmp_path, "lean", 1, 0, [0.1, 0.2, 0.2], evals=[(3, 0.25)])
    _models(
        ppo, actor=135_000_000, critic=134_000_000, reference=135_000_000, reward_model=162_000_000
    )
    (ppo / "reward_servers.json").write_text(json.dumps({"peak_rss_mb": [2048.0, None]}))
    _models(lean, actor=135_000_000)
    runs, settings, thr = compare_runs([str(tmp_path)], threshold=0.4, window=1)
    lines = models_table(settings, thr)
    assert lines[0].startswith("| setting | models resident | parameters (M) |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert (
        "| epochs=2 | actor+critic+reference+reward_model | actor 135, critic 134, "
        "reference 135, reward_model 162 | 1003 | 2048 | 12.0 | 16 (1/1) | 0.500 |"
        == rows["epochs=2"]
    )
    assert (
        "| epochs=1 | actor | actor 135 | 1003 | - | 12.0 | not reached (0/1) | 0.250 |"
        == rows["epochs=1"]
    )
    (ppo / "models.json").unlink()
    (lean / "models.json").unlink()
    runs, settings, thr = compare_runs([str(tmp_path)], threshold=0.4, window=1)
    assert models_table(settings, thr) == []  # old runs: no table


def test_learner_records_its_models(tmp_path, tiny_lm):
    cfg = Config.model_validate(
        {
            "reward": {"functions": [{"name": "reward_model"}]},
            "reward_model": {"path": str(tmp_path / "rm")},
        }
    )
    (tmp_path / "rm").mkdir()
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, tmp_path / "rm" / "model.safetensors")
    assert safetensors_params(tmp_path / "rm") == 17
    n = sum(p.numel() for p in tiny_lm.parameters())  # tied embeddings counted once
    assert module_params(tiny_lm) == n
    models = resident_models(cfg, tiny_lm, tiny_lm, None)
    assert models == {
        "actor": {"where": "learner", "params": n},
        "reference": {"where": "learner", "params": n},
        "reward_model": {"where": "reward server", "params": 17},
    }
    write_models(str(tmp_path), models)
    assert json.loads((tmp_path / "models.json").read_text()) == models
