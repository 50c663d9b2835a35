"""`grpo-stream replay` on a run folder built by hand: tiny model, real buffer, CPU.

The run folder holds a real Arrow buffer of synthetic groups whose behaviour log-probs
were computed here with the tiny model itself (at the config's temperature), a
config.toml, and a trained_batches.jsonl of three steps (one with a dropped group).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from bench.synth import make_groups
from grpo_stream.buffer.store import open_writer
from grpo_stream.config import Config, ModelConfig
from grpo_stream.learner.batch import collate
from grpo_stream.learner.checkpoint import save_checkpoint
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.policy import load_causal_lm, sequence_logprobs
from grpo_stream.learner.replay import TIMING_KEYS, replay_cli
from grpo_stream.serving.model import build_tiny_model, resolve_model_path

TEMPERATURE = 0.7
STEPS = [  # what a learner recorded: step 2 trained group 3 only (group 2 was stale)
    {"step": 1, "group_ids": [0, 1], "cursor_start": 0, "cursor_end": 2},
    {"step": 2, "group_ids": [3], "cursor_start": 2, "cursor_end": 4},
    {"step": 3, "group_ids": [4, 5], "cursor_start": 4, "cursor_end": 6},
]
PERTURB = 0.05  # added to every stored log-prob of group 0 in the perturbed copy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    # hidden 32: the 49,152-token embedding and head dominate; keep AdamW steps cheap
    tok = resolve_model_path(ModelConfig())
    return build_tiny_model(out, tokenizer_from=tok, num_layers=2, hidden=32, heads=1)


def make_config(tiny: Path, run_dir: Path) -> Config:
    cfg = Config()
    cfg.model.path = str(tiny)
    cfg.run.run_dir = str(run_dir)
    cfg.generator.temperature = TEMPERATURE
    cfg.sync.transport = "none"
    lc = cfg.learner
    lc.device, lc.num_threads, lc.lr, lc.max_steps = "cpu", 1, 1e-3, 3
    lc.batch_groups, lc.micro_batch_size, lc.epochs, lc.minibatches_per_epoch = 2, 4, 2, 2
    return cfg


@torch.no_grad()
def fill_behaviour_logprobs(groups, tiny: Path) -> None:
    """Give every sample the tiny model's own log-probs of its completion."""
    model = load_causal_lm(str(tiny), torch.device("cpu"), trainable=False)
    for g in groups:
        mb = collate(g, [0.0] * len(g), list(range(len(g))), pad_id=2)
        lp, _ = sequence_logprobs(model, mb, TEMPERATURE, 1024)  # [B, T]
        for row, s in enumerate(g):
            s.behaviour_logprobs = lp[row][mb.mask[row] > 0].tolist()


def write_run(run_dir: Path, tiny: Path, groups) -> Path:
    run_dir.mkdir(parents=True)
    w = open_writer(str(run_dir / "buffer"), backend="arrow", run_id="replay-test", fsync=False)
    for g in groups:
        w.append_groups([g])
    w.close()
    (run_dir / "config.toml").write_text(make_config(tiny, run_dir).to_toml())
    (run_dir / "trained_batches.jsonl").write_text("".join(json.dumps(r) + "\n" for r in STEPS))
    return run_dir


@pytest.fixture(scope="module")
def groups(tiny: Path):
    # groups 0-3 by policy version 0, groups 4-5 by version 1
    gs = make_groups(4, group_size=4, prompt_len=8, completion_len=8, version=0)
    gs += make_groups(2, start=4, group_size=4, prompt_len=8, completion_len=8, version=1)
    fill_behaviour_logprobs(gs, tiny)
    return gs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny: Path, groups) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "run", tiny, groups)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_two_replays_give_identical_metrics(run_dir: Path, tmp_path: Path) -> None:
    for name, seed in (("a", "0"), ("b", "0"), ("c", "3")):
        assert replay_cli([str(run_dir), "--seed", seed, "--out", str(tmp_path / name)]) == 0
    a, b, c = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in "abc")
    assert [r["step"] for r in a] == [1, 2, 3]
    assert [r["samples"] for r in a] == [8, 4, 8]  # step 2 trained group 3 alone
    assert [r["staleness_mean"] for r in a] == [0.0, 1.0, 1.0]  # versions 0,0,1 at v1,v2
    assert all(math.isfinite(r["loss"]) and r["loss"] != 0.0 for r in a)
    assert without_timing(a) == without_timing(b)  # exact, every key and value
    # two optimizer steps per epoch over two micro-batches: the seeded order matters, so
    # the equality above is not vacuous
    assert [r["loss"] for r in a] != [r["loss"] for r in c]


def test_replay_from_a_checkpoint_runs_the_later_steps(
    run_dir: Path, tiny: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = make_config(tiny, run)
    model = load_causal_lm(str(tiny), torch.device("cpu"))  # weights of "version 1"
    opt, sched = build_optimizer(model, cfg.learner)
    save_checkpoint(str(run), 1, model, opt, sched, {"version": 1, "cursor": {"position": 2}})
    outs = [tmp_path / "c1", tmp_path / "c2"]
    for out in outs:
        args = [str(run), "--checkpoint", "step-1", "--steps", "2", "--check-logprobs"]
        args += ["--out", str(out)]
        assert replay_cli(args) == 0
    a, b = (read_jsonl(o / "metrics.jsonl") for o in outs)
    assert [r["step"] for r in a] == [2, 3]
    assert without_timing(a) == without_timing(b)
    drift = json.loads((outs[0] / "logprob_drift.json").read_text())
    assert drift["checkpoint_version"] == 1
    assert drift["by_version"]["1"]["comparable"] and not drift["by_version"]["0"]["comparable"]


def test_check_logprobs_matches_own_logprobs(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "drift"
    assert replay_cli([str(run_dir), "--check-logprobs", "--no-train", "--out", str(out)]) == 0
    report = json.loads((out / "logprob_drift.json").read_text())
    assert not (out / "metrics.jsonl").exists()  # --no-train
    v0, v1 = report["by_version"]["0"], report["by_version"]["1"]
    assert v0["comparable"] and not v1["comparable"]
    assert v0["sequences"] == 12 and v1["sequences"] == 8  # groups 0,1,3 and 4,5
    assert v0["max_abs"] < 1e-4
    assert len(report["sequences"]) == 20
    assert sum(b["count"] for b in v0["histogram"]) == v0["tokens"] > 0


def test_check_logprobs_shows_a_perturbation(groups, tiny: Path, tmp_path: Path) -> None:
    bent = [[s.__class__(**{**s.__dict__}) for s in g] for g in groups]
    for s in bent[0]:
        s.behaviour_logprobs = [x + PERTURB for x in s.behaviour_logprobs]
    run = write_run(tmp_path / "bent", tiny, bent)
    assert replay_cli([str(run), "--check-logprobs", "--no-train"]) == 0
    report = json.loads((run / "replay" / "init" / "logprob_drift.json").read_text())
    by_group = {}
    for r in report["sequences"]:
        by_group.setdefault(r["group_id"], []).append(r)
    for r in by_group[0]:
        assert r["mean_abs"] == pytest.approx(PERTURB, abs=1e-4)
        assert r["mean_signed"] == pytest.approx(-PERTURB, abs=1e-4)  # recomputed - stored
    assert all(r["max_abs"] < 1e-4 for g in (1, 3) for r in by_group[g])
    assert report["by_version"]["0"]["max_abs"] == pytest.approx(PERTURB, abs=1e-4)


def test_user_errors_name_the_file(run_dir: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert replay_cli([str(empty)]) == 2
    assert "config.toml" in capsys.readouterr().err
    no_batches = tmp_path / "nb"
    shutil.copytree(run_dir, no_batches)
    (no_batches / "trained_batches.jsonl").unlink()
    assert replay_cli([str(no_batches)]) == 2
    assert "trained_batches.jsonl" in capsys.readouterr().err
    assert replay_cli([str(run_dir), "--checkpoint", "step-9"]) == 2
    assert "step-9" in capsys.readouterr().err
