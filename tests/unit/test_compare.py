"""`grpo-stream compare` on synthetic run folders with known metrics: the settings
(config minus the run section), samples-to-threshold on the trailing-mean reward, the
per-setting mean/std/spread over seeds, the per-epoch clip fractions, the mismatch and
cost columns, the conclusion's seed-spread verdict, the PNGs and the doc section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from grpo_stream.analysis.compare import compare_runs
from grpo_stream.analysis.compare_cli import compare_cli
from grpo_stream.analysis.compare_table import conclusion
from grpo_stream.core import metric_names as M


def make_run(root: Path, name: str, epochs: int, seed: int, rewards: list[float],
             clip2: float = 0.2, evals: list[tuple[int, float]] = (),
             reward: str = "numeric_answer") -> Path:  # fmt: skip
    """A run folder: 8 samples and 10 s per step, clip 0 in epoch 1."""
    rd = root / name
    rd.mkdir(parents=True)
    config = {"run": {"seed": seed, "run_dir": str(rd)}, "learner": {"epochs": epochs},
              "loss": {"beta": 0.0}, "reward": {"functions": [{"name": reward}]}}  # fmt: skip
    (rd / "config.toml").write_text(tomli_w.dumps(config))
    rows = []
    for i, r in enumerate(rewards, 1):
        row = {M.STEP: i, M.REWARD_MEAN: r, M.SAMPLES: 8, M.STEP_S: 10.0 + i,
               M.APPROX_KL_PROXIMAL: 0.001 * i, M.BEHAVIOUR_LOGPROB_ABS_DIFF: 0.01,
               M.TIS_TRUNCATED_FRAC: 0.0, M.PEAK_MEMORY_MB: 1000.0 + i,
               M.clip_frac_epoch(1): 0.0, M.CLIP_FRAC: clip2 / 2}  # fmt: skip
        if epochs > 1:
            row[M.clip_frac_epoch(2)] = clip2
        rows.append(row)
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [{"policy_version": v, "step": v, "greedy_pass_at_1": acc} for v, acc in evals]
    if lines:
        (rd / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return rd


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    # trailing means over 2 steps:
    # a: 0.1 0.2 0.4 0.6 -> reaches 0.4 at step 3 (24 samples), final 0.6
    # b: 0.2 0.4 0.7 0.8 -> reaches 0.4 at step 2 (16 samples), final 0.8
    # c: 0.0 0.1 0.2 0.4 -> reaches 0.4 at step 4 (32 samples), final 0.4
    return [
        make_run(tmp_path, "a", 1, 0, [0.1, 0.3, 0.5, 0.7], evals=[(0, 0.25), (4, 0.75)]),
        make_run(tmp_path, "b", 2, 0, [0.2, 0.6, 0.8, 0.8], clip2=0.1),
        make_run(tmp_path, "c", 2, 1, [0.0, 0.2, 0.2, 0.6], clip2=0.3),
    ]


def test_numbers_per_run_and_per_setting(runs):
    got, settings, thr = compare_runs([str(p) for p in runs], threshold=0.4, window=2)
    assert thr == 0.4
    a, b, c = got
    assert [r.setting for r in got] == ["epochs=1", "epochs=2", "epochs=2"]  # seeds grouped
    assert [r.stats["samples_to_threshold"] for r in got] == [24.0, 16.0, 32.0]
    assert [r.stats["final_reward"] for r in got] == pytest.approx([0.6, 0.8, 0.4])
    assert a.stats["eval"] == 0.75 and b.stats["eval"] is None
    assert a.wall == [11.0, 23.0, 36.0, 50.0] and a.stats["s_per_step"] == 12.5  # median
    assert a.stats["peak_mb"] == 1004.0
    assert a.stats["approx_kl"] == pytest.approx(0.0025)
    assert a.stats["clip_epoch"] == {1: 0.0} and b.stats["clip_epoch"] == {1: 0.0, 2: 0.1}
    one, two = settings
    assert [r.name for r in two.runs] == ["b", "c"]
    stt = two.summary("samples_to_threshold")
    assert stt["mean"] == 24.0 and stt["spread"] == 16.0
    assert stt["std"] == pytest.approx(11.3137, abs=1e-4)  # sample std of 16, 32
    fin = two.summary("final_reward")
    assert fin["mean"] == pytest.approx(0.6) and fin["spread"] == pytest.approx(0.4)
    # the settings' means tie (0.6 and 24) while seeds differ by 0.4 and 16
    assert all("seeds disagree more than settings differ" in x for x in conclusion(settings, 0.4))


def test_auto_threshold_and_not_reached(runs):
    got, _, thr = compare_runs([str(p) for p in runs], window=2)
    assert thr == 0.4  # halfway from the lowest first (0.0) to the highest last (0.8)
    got, settings, _ = compare_runs([str(p) for p in runs], threshold=0.7, window=2)
    assert [r.stats["samples_to_threshold"] for r in got] == [None, 24.0, None]
    assert settings[1].summary("samples_to_threshold")["n"] == 1  # 1 of 2 seeds got there
    verdict = conclusion(settings, 0.7)[1]
    assert verdict.startswith("On the samples to reach reward 0.700, fewer than two settings")
    assert "epochs=1: no run got there" in verdict


def test_settings_that_differ_more_than_their_seeds(tmp_path):
    paths = [make_run(tmp_path, "lo0", 1, 0, [0.1, 0.2, 0.2, 0.2]),
             make_run(tmp_path, "lo1", 1, 1, [0.1, 0.2, 0.2, 0.25]),
             make_run(tmp_path, "hi0", 4, 0, [0.5, 0.8, 0.9, 0.9]),
             make_run(tmp_path, "hi1", 4, 1, [0.5, 0.8, 0.9, 0.95])]  # fmt: skip
    _, settings, _ = compare_runs([str(p) for p in paths], threshold=0.5, window=1)
    verdict = conclusion(settings, 0.5)[0]
    assert (
        "best setting is `epochs=4`" in verdict
        and "larger than the largest seed spread (0.050)" in verdict
    )
    assert "disagree" not in verdict


def test_different_rewards_are_flagged_and_held_out_accuracy_judged(tmp_path):
    paths = [make_run(tmp_path, "rule", 2, 0, [0.2, 0.6], evals=[(2, 0.5)]),
             make_run(tmp_path, "len", 2, 0, [0.1, 0.3], evals=[(2, 0.75)],
                      reward="length_penalty")]  # fmt: skip
    _, settings, _ = compare_runs([str(p) for p in paths], threshold=0.25, window=1)
    assert [s.name for s in settings] == ["functions=numeric_answer", "functions=length_penalty"]
    verdicts = conclusion(settings, 0.25)
    assert len(verdicts) == 4
    assert verdicts[0].startswith("On the final reward, the best setting is "
                                  "`functions=numeric_answer` (0.600)")  # fmt: skip
    assert verdicts[2].startswith("On the held-out accuracy (last evaluation), the best "
                                  "setting is `functions=length_penalty` (0.750)")  # fmt: skip
    assert "different `reward.functions`" in verdicts[3]
    same = [make_run(tmp_path / "b", n, e, 0, [0.2, 0.6], evals=[(2, 0.5)])
            for n, e in (("one", 1), ("two", 2))]  # fmt: skip
    _, settings, _ = compare_runs([str(p) for p in same], threshold=0.25, window=1)
    assert not any("reward.functions" in v for v in conclusion(settings, 0.25))


def test_cli_writes_table_pngs_and_doc_section(runs, tmp_path):
    out, doc = tmp_path / "cmp", tmp_path / "docs" / "experiments.md"
    doc.parent.mkdir()
    argv = [str(tmp_path), "--out", str(out), "--threshold", "0.4", "--smooth", "2",
            "--title", "Epochs", "--write-doc", str(doc)]  # fmt: skip
    assert compare_cli(argv) == 0
    md = (out / "compare.md").read_text()
    assert "| epochs=2 | 0,1 | 4.0 | 32 | 0.600 ± 0.283 | 24 ± 11 | - | 0.000 / 0.200 |" in md
    assert "| epochs=1 | 0 | 4.0 | 32 | 0.600 | 24 | 0.750 | 0.000 |" in md
    assert "| c | 1 | 4 | 32 | 50 | 0.400 | 32 |" in md
    for png in ("curves.png", "diagnostics.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert (doc.parent / "experiments" / "epochs" / png).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"][1]["samples_to_threshold"]["mean"] == 24.0
    text = doc.read_text()
    assert "](experiments/epochs/curves.png)" in text
    assert compare_cli(argv) == 0  # a rerun replaces the section, never appends one
    assert doc.read_text().count("<!-- compare:epochs -->") == 1


def test_doc_images_written_straight_into_the_docs_folder(runs, tmp_path):
    """--out naming the doc's own image folder: the pictures are already there (no
    copy of a file onto itself), and the section links them."""
    doc = tmp_path / "docs" / "experiments.md"
    out = doc.parent / "experiments" / "epochs"
    out.mkdir(parents=True)
    argv = [str(tmp_path), "--out", str(out), "--title", "Epochs", "--write-doc", str(doc)]
    assert compare_cli(argv) == 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "](experiments/epochs/curves.png)" in doc.read_text()


def test_sweep_points_are_named_by_the_sweeps_choices(runs):
    """Every run a sweep point (sweep_done.json): settings take the sweep's choice minus
    the seed (a bundle's name), not every config key the bundle set."""
    for path, name in zip(runs, ["ppo", "lean", "lean"], strict=True):
        choice = {"setting": name, "run.seed": 0}
        (path / "sweep_done.json").write_text(json.dumps({"point": name, "choice": choice}))
    got, settings, _ = compare_runs([str(p) for p in runs], threshold=0.4, window=2)
    assert [r.setting for r in got] == ["setting=ppo", "setting=lean", "setting=lean"]
    assert [len(s.runs) for s in settings] == [1, 2]
    (runs[0] / "sweep_done.json").unlink()  # one run not a point: named by its config
    assert [r.setting for r in compare_runs([str(p) for p in runs], 0.4, 2)[0]] == [
        "epochs=1",
        "epochs=2",
        "epochs=2",
    ]
