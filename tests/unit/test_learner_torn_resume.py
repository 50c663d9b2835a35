"""A learner killed in the middle of writing its records resumes (issue 20, defect 7):
RUN/trained_batches.jsonl and RUN/metrics.jsonl end in a torn line, and `learn --resume`
(RunRecords cutting both logs back to the checkpoint's step) must neither fail on the
fragment nor glue it onto the next row."""

from __future__ import annotations

from pathlib import Path

from test_learner_loop import append, groups_with, make_config, tiny  # noqa: F401 (fixture)

from grpo_stream.core import jsonl
from grpo_stream.learner.loop import Learner


def test_resume_after_a_torn_trained_batches_line(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    append(run, groups_with(set(), [0] * 8))
    cfg = make_config(tiny, run, max_steps=2, max_staleness=100)
    (run / "config.toml").write_text(cfg.to_toml())
    Learner(cfg, str(run), str(tiny)).run()
    # killed while recording step 3, after its checkpoint-less step: both logs torn
    with open(run / "trained_batches.jsonl", "a") as f:
        f.write('{"step": 3, "group_ids": [4, ')
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')
    cfg.learner.max_steps = 4
    Learner(cfg, str(run), str(tiny), resume=True).run()
    batches = jsonl.read(run / "trained_batches.jsonl")
    assert [(b["step"], b["group_ids"]) for b in batches] == [
        (1, [0, 1]), (2, [2, 3]), (3, [4, 5]), (4, [6, 7])
    ]  # fmt: skip
    assert [m["step"] for m in jsonl.read(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (run / "trained_batches.jsonl").read_text().endswith("\n")
