"""The learner process in-process on a tiny model and a real Arrow buffer (CPU):

- `learn` and `replay` train through one step function: on the same stored batches and
  checkpoint their metrics rows are equal key for key, except the wall-clock keys;
- a batch whose every group is dropped still publishes the learner's progress (the
  generator's staleness gate waits on it), and training goes on after it;
- `buffer.on_corrupt` reaches the learner's and replay's readers, `buffer.poll_s` the
  learner's cursor.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from bench.synth import make_groups
from grpo_stream.buffer.base import CorruptSegmentError
from grpo_stream.buffer.store import open_writer
from grpo_stream.config import Config, ModelConfig
from grpo_stream.core import metric_names as M
from grpo_stream.core.progress import read_progress
from grpo_stream.learner.loop import Learner
from grpo_stream.learner.replay import read_batches, replay_cli
from grpo_stream.learner.setup import open_cursor
from grpo_stream.serving.model import build_tiny_model, resolve_model_path

NAN = float("nan")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    # hidden 32: the 49,152-token embedding and head dominate; keep AdamW steps cheap
    tok = resolve_model_path(ModelConfig())
    return build_tiny_model(out, tokenizer_from=tok, num_layers=2, hidden=32, heads=1)


def make_config(tiny: Path, run_dir: Path, **learner) -> Config:
    cfg = Config()
    cfg.model.path = str(tiny)
    cfg.run.run_dir = str(run_dir)
    cfg.generator.temperature = 0.7
    cfg.sync.transport = "none"
    settings = {"device": "cpu", "num_threads": 1, "lr": 1e-3, "max_steps": 3,
                "batch_groups": 2, "micro_batch_size": 4, "epochs": 2,
                "minibatches_per_epoch": 2, "checkpoint_every": 1, "wait_timeout_s": 120.0,
                **learner}  # fmt: skip
    for k, v in settings.items():
        setattr(cfg.learner, k, v)
    return cfg


def append(run_dir: Path, groups, per_append: int = 100) -> None:
    w = open_writer(str(run_dir / "buffer"), backend="arrow", run_id="loop-test", fsync=False)
    for i in range(0, len(groups), per_append):
        w.append_groups(groups[i : i + per_append])
    w.close()


def groups_with(rewards_nan: set[int], versions: list[int], start: int = 0) -> list:
    out = []
    for i, v in enumerate(versions):
        (g,) = make_groups(1, start=start + i, group_size=4, prompt_len=6, completion_len=6,
                           version=v)  # fmt: skip
        if start + i in rewards_nan:  # a reward function that failed
            for s in g:
                s.reward = NAN
        out.append(g)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_learner_and_replay_log_the_same_rows(tiny: Path, tmp_path: Path) -> None:
    """Step 1 trains groups 0,1; step 2 drops group 2 as stale (version 0 at learner
    version 1, max_staleness 0) and trains group 3; step 3 drops group 4 (failed reward)."""
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with({4}, [0, 0, 0, 1, 2, 2]))
    cfg = make_config(tiny, run, max_staleness=0, keep_checkpoints=2)  # step-2 replayed
    (run / "config.toml").write_text(cfg.to_toml())
    Learner(cfg, str(run), str(tiny)).run()
    learned = read_jsonl(run / "metrics.jsonl")
    assert [r[M.STEP] for r in learned] == [1, 2, 3]
    assert [r[M.SAMPLES] for r in learned] == [8, 4, 4]
    assert [r[M.STALE_GROUPS_DROPPED] for r in learned] == [0, 1, 0]
    assert [r[M.REWARD_FAILED_GROUPS] for r in learned] == [0, 0, 1]
    assert all(math.isfinite(r[M.LOSS]) and r[M.LOSS] != 0 for r in learned)
    batches = read_jsonl(run / "trained_batches.jsonl")
    assert [b["group_ids"] for b in batches] == [[0, 1], [3], [4, 5]]

    assert replay_cli([str(run), "--out", str(tmp_path / "init")]) == 0
    assert replay_cli([str(run), "--checkpoint", "step-2", "--out", str(tmp_path / "c2")]) == 0
    from_init = read_jsonl(tmp_path / "init" / "metrics.jsonl")
    from_ckpt = read_jsonl(tmp_path / "c2" / "metrics.jsonl")

    def same(a: dict, b: dict) -> None:
        assert set(a) - set(M.LEARNER_ONLY) == set(b)
        for k in set(b) - set(M.WALL_CLOCK):
            assert a[k] == b[k], (a[M.STEP], k, a[k], b[k])

    for a, b in zip(learned, from_init, strict=True):
        same(a, b)
    same(learned[2], from_ckpt[0])
    # the clip fractions the loss reports are the ones both rows carry (defect: replay
    # read other names and logged 0)
    for r in from_init:
        assert r[M.CLIP_FRAC] == r[M.CLIP_LOW_FRAC] + r[M.CLIP_HIGH_FRAC]


def _run_in_thread(learner: Learner) -> tuple[threading.Thread, list]:
    errors: list = []

    def body() -> None:
        try:
            learner.run()
        except BaseException as e:  # re-raised by the test
            errors.append(e)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, errors


def test_a_batch_entirely_dropped_publishes_progress(tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with({0, 1}, [0, 0]))  # both rewards failed: nothing to train
    cfg = make_config(tiny, run, max_steps=1)
    cfg.buffer.poll_s = 0.01
    buffer = cfg.buffer_path()
    t, errors = _run_in_thread(Learner(cfg, str(run), str(tiny)))
    deadline = time.monotonic() + 180  # loading included, on a busy 2-core box
    while read_progress(buffer).consumed_groups < 2:  # the learner now waits for groups 2-3
        assert not errors, errors
        assert time.monotonic() < deadline, "dropped batch: progress never published"
        time.sleep(0.05)
    p = read_progress(buffer)
    assert (p.consumed_groups, p.step, p.version, p.finished) == (2, 0, 0, False)
    append(run, groups_with(set(), [0, 0], start=2))
    t.join(120)
    assert not t.is_alive() and not errors, errors
    p = read_progress(buffer)
    assert (p.consumed_groups, p.step, p.version, p.finished) == (4, 1, 1, True)
    (batch,) = read_jsonl(run / "trained_batches.jsonl")
    assert batch == {"step": 1, "group_ids": [2, 3], M.CURSOR_START: 2, M.CURSOR_END: 4,
                     M.STALE_GROUPS_DROPPED: 0}  # fmt: skip
    (row,) = read_jsonl(run / "metrics.jsonl")
    assert (row[M.STEP], row[M.GROUPS], row[M.SAMPLES]) == (1, 2, 8)


def _corrupt_second_segment(run: Path) -> str:
    segs = sorted((run / "buffer").rglob("seg-*.arrow"))
    assert len(segs) == 2, segs
    data = segs[1].read_bytes()
    segs[1].write_bytes(data[: len(data) // 2])  # torn: unreadable
    return segs[1].name


def test_buffer_settings_reach_the_readers_and_the_cursor(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with(set(), [0, 0, 0, 0]), per_append=2)
    name = _corrupt_second_segment(run)
    cfg = Config()
    cfg.run.run_dir = str(run)
    cursor = open_cursor(cfg, str(run))  # defaults: skip corrupt segments, poll 0.02 s
    assert cursor.poll_s == 0.02
    groups, _ = cursor.next_groups(4, timeout_s=5)
    assert [g[0].group_id for g in groups] == [0, 1] and cursor.skipped_corrupt == 2

    cfg.buffer.on_corrupt, cfg.buffer.poll_s = "error", 0.125
    cursor = open_cursor(cfg, str(run))
    assert cursor.poll_s == 0.125
    assert [g[0].group_id for g in cursor.next_groups(2, timeout_s=5)[0]] == [0, 1]
    with pytest.raises(CorruptSegmentError, match=name):
        cursor.next_groups(2, timeout_s=5)
    rec = {M.STEP: 2, "group_ids": [2, 3], M.CURSOR_START: 2, M.CURSOR_END: 4}
    with pytest.raises(CorruptSegmentError, match=name):
        read_batches(cfg, run, [rec])  # replay's reader
    cfg.buffer.on_corrupt = "skip"
    with pytest.raises(Exception, match="not readable"):  # skipped, then found missing
        read_batches(cfg, run, [rec])
