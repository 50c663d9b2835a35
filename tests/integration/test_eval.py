"""Held-out evaluation during a real run (`grpo-stream run`: its own vLLM CPU server on
the tiny model, generator, learner and evaluator): with eval.every = 1 there is one row
in RUN/eval.jsonl per version 0, 1, 2 and the final 3; each row's version is what the
server's /weight_info said before and after every one of its requests; no eval prompt
reaches the training buffer; the learner logged its waits; the run prints the summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grpo_stream.buffer.store import open_reader
from grpo_stream.config import load_config
from grpo_stream.tasks.heldout import heldout_prompts
from grpo_stream.tasks.prompt import strip_instruction
from grpo_stream.tasks.sources import question_key
from tests.conftest import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(module_tmp, tiny_model_dir):
    run_dir = module_tmp / "eval-run"
    overrides = [
        f"run.run_dir={run_dir}",
        f"model.path={tiny_model_dir}",
        f"server.port={free_port()}",
        "server.startup_timeout_s=600",
        "learner.max_steps=3",
        "learner.checkpoint_every=3",
        "eval.every=1",
        "eval.num_prompts=4",
        "eval.k=2",
        "eval.max_concurrency=2",
    ]
    argv = [sys.executable, "-m", "grpo_stream.cli", "run", "--config", "configs/tiny.toml"]
    proc = subprocess.run(argv + overrides, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config("configs/tiny.toml", overrides)
    return run_dir, proc.stdout, cfg


def test_a_row_per_version_at_that_version(run):
    run_dir, _, _ = run
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [0, 1, 2, 3]
    for r in rows:  # /weight_info before and after each request said this version
        assert r["versions_seen"] == [r["policy_version"]] and not r["version_mismatch"]
        assert r["prompts"] == 4 and r["k"] == 2 and r["failed_prompts"] == 0
        for key in ("greedy_pass_at_1", "mean_at_k", "pass_at_k", "truncated_frac"):
            assert 0.0 <= r[key] <= 1.0
        assert r["length_mean"] > 0 and r["eval_s"] > 0
        assert set(r["reward_components"]) == {"numeric_answer", "concise_answer"}


def test_no_eval_prompt_in_the_training_buffer(run):
    run_dir, _, cfg = run
    held = {question_key(p, cfg.task) for p in heldout_prompts(cfg)}
    reader = open_reader(str(run_dir / "buffer"))
    samples = [s for g in reader.read_groups(0, reader.num_groups()) for s in g]
    assert len(samples) >= 3 * cfg.learner.batch_groups * cfg.generator.group_size
    asked = {strip_instruction(s.prompt_text, cfg.task.resolved_instruction()) for s in samples}
    assert all(s.prompt_id.startswith("arithmetic-s0-") for s in samples)  # training seed
    assert not {s.prompt_text for s in samples} & {p.text for p in heldout_prompts(cfg)}
    assert not asked & held


def test_learner_waited_for_due_versions_and_run_prints_the_summary(run):
    run_dir, stdout, _ = run
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("eval_wait_s" in m for m in metrics)  # every sync replaced a due version
    assert "[run] held-out pass@1 (greedy) on 4 prompts:" in stdout
    assert stdout.strip().splitlines()[-1].endswith(run_dir.name)


def test_standalone_eval_of_the_runs_latest_checkpoint(run, tmp_path):
    run_dir, _, _ = run
    out = tmp_path / "eval.json"
    argv = [sys.executable, "-m", "grpo_stream.cli", "eval", "--model", str(run_dir)]
    argv += ["--json", str(out), "--log-dir", str(tmp_path), f"server.port={free_port()}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["model"] == str(run_dir) and row["step"] == 3  # checkpoints/step-3
    assert row["prompts"] == 4 and row["k"] == 2  # the run's own [eval] settings
    assert proc.stdout.splitlines()[0].split()[:3] == ["model", "prompts", "k"]
