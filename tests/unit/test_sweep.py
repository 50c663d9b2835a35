"""`grpo-stream sweep`: grid expansion (point names, override order, union of grids,
exclusions, bundles, budgets) and resume of a half-finished sweep. The resume test
replaces the subprocess launcher with one that writes a run folder's metrics, the only
place the launcher is injected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo_stream.analysis.sweep import (
    DONE_FILE,
    SweepError,
    all_overrides,
    expand,
    load_sweep,
    point_config,
    point_dir,
    run_sweep,
    state,
    sweep_cli,
)

ROOT = Path(__file__).parents[2]
TINY = ROOT / "configs" / "tiny.toml"  # batch_groups 2, group_size 4: 8 samples per step

EPOCHS = f"""
[sweep]
base = "{TINY}"
out_dir = "OUT"
[sweep.budget]
samples = 20
[sweep.labels]
"loss.behaviour_correction" = "correction"
[[sweep.grid]]
"learner.epochs" = [1, 2, 4]
"loss.behaviour_correction" = ["tis"]
"run.seed" = [0, 1]
[[sweep.grid]]
learner.epochs = [2]
loss.behaviour_correction = ["none"]
run.seed = [0, 1]
[[sweep.exclude]]
"learner.epochs" = 4
"run.seed" = 1
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sweep.toml"
    p.write_text(text.replace('"OUT"', json.dumps(str(tmp_path / "out"))))
    return p


def test_points_are_the_union_of_the_grids_in_axis_order(tmp_path):
    sw = load_sweep(write(tmp_path, EPOCHS))
    points = expand(sw)
    assert [p.name for p in points] == [
        "epochs=1,correction=tis,seed=0",
        "epochs=1,correction=tis,seed=1",
        "epochs=2,correction=tis,seed=0",
        "epochs=2,correction=tis,seed=1",
        "epochs=4,correction=tis,seed=0",  # epochs=4,seed=1 excluded
        "epochs=2,correction=none,seed=0",
        "epochs=2,correction=none,seed=1",
    ]
    p = points[5]
    assert p.overrides == ["learner.epochs=2", 'loss.behaviour_correction="none"', "run.seed=0"]
    assert p.budget == ["learner.max_steps=3"]  # ceil(20 / (2 groups * 4 samples))
    cfg = point_config(sw, p, p.budget)
    assert (cfg.learner.epochs, cfg.loss.behaviour_correction, cfg.run.seed) == (2, "none", 0)
    assert cfg.learner.max_steps == 3
    assert point_dir(sw, p) == tmp_path / "out" / "epochs=2,correction=none,seed=0"


def test_bundles_and_list_values_and_per_point_budget(tmp_path):
    text = f"""
[sweep]
base = "{TINY}"
[sweep.budget]
samples = 16
[sweep.bundles.model]
actor = {{ "loss.beta" = 0.0 }}
actor_ref = {{ "loss.beta" = 0.04, "loss.kl_estimator" = "k3" }}
[sweep.bundles.reward]
rule = {{ "reward.functions" = [{{ name = "numeric_answer" }}] }}
rule_len = {{ "reward.functions" = [{{ name = "numeric_answer" }},
             {{ name = "length_penalty", weight = 0.5, kwargs = {{ target = 4, limit = 40 }} }}] }}
[[sweep.grid]]
model = ["actor", "actor_ref"]
reward = ["rule", "rule_len"]
"generator.group_size" = [4, 8]
"""
    sw = load_sweep(write(tmp_path, text))
    points = {p.name: p for p in expand(sw)}
    assert len(points) == 8
    p = points["model=actor_ref,reward=rule_len,group_size=8"]
    assert p.overrides[:2] == ["loss.beta=0.04", 'loss.kl_estimator="k3"']
    assert p.budget == ["learner.max_steps=1"]  # 16 / (2 * 8)
    assert points["model=actor,reward=rule,group_size=4"].budget == ["learner.max_steps=2"]
    cfg = point_config(sw, p)
    assert cfg.loss.beta == 0.04 and cfg.loss.kl_estimator == "k3"
    fns = cfg.reward.functions
    assert [f.name for f in fns] == ["numeric_answer", "length_penalty"]
    assert fns[1].weight == 0.5 and fns[1].kwargs == {"target": 4, "limit": 40}


def test_wall_time_budget_sets_the_learner_field(tmp_path):
    text = EPOCHS.replace("samples = 20", "wall_s = 600\nmax_steps = 50")
    (p, *_) = expand(load_sweep(write(tmp_path, text)))
    assert p.budget == ["learner.max_wall_s=600.0", "learner.max_steps=50"]
    assert point_config(load_sweep(tmp_path / "sweep.toml"), p, p.budget).learner.max_wall_s == 600


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("samples = 20", "samples = 20\nwall_s = 5"), "exactly one of"),
        (('"run.seed" = [0, 1]', '"run.seed" = 0'), "non-empty list"),
        (('"run.seed" = [0, 1]', '"run.seed" = [0]\n"task.seed" = [0]'), "share a short name"),
        (('"run.seed" = [0, 1]', '"learner.epochz" = [0]'), "learner.epochz"),
    ],
)
def test_bad_sweep_files_name_the_field(tmp_path, edit, message):
    with pytest.raises(SweepError, match=message):
        expand(load_sweep(write(tmp_path, EPOCHS.replace(*edit, 1))))


def finished(sw, p, overrides=None) -> None:
    """A done marker as `sweep` writes it after a successful run."""
    point_dir(sw, p).mkdir(parents=True)
    record = {"overrides": all_overrides(sw, p) if overrides is None else overrides}
    (point_dir(sw, p) / DONE_FILE).write_text(json.dumps(record))


def test_a_point_finished_with_other_overrides_runs_again(tmp_path):
    sw = load_sweep(write(tmp_path, EPOCHS))
    p = expand(sw)[0]
    older = all_overrides(sw, p)[:-1] + ["learner.max_steps=2"]  # an older, smaller budget
    finished(sw, p, older)
    assert state(sw, p) == "changed"
    launched: list[str] = []
    run_sweep(sw, _fake_launcher(launched, fail=set()))
    assert launched[0] == p.name and state(sw, p) == "done"


def _fake_launcher(launched: list[str], fail: set[str]):
    """Stands in for `grpo-stream run`: writes two metrics rows into run.run_dir."""

    def launch(argv: list[str], run_dir: Path) -> int:
        assert argv[-1] == f"run.run_dir={json.dumps(str(run_dir.resolve()))}"
        launched.append(run_dir.name)
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoints").mkdir()
        if run_dir.name in fail:
            return 1
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
        return 0

    return launch


def test_resume_skips_done_points_and_restarts_partial_ones(tmp_path, capsys):
    sw = load_sweep(write(tmp_path, EPOCHS))
    points = expand(sw)
    for p in points[:2]:  # finished earlier
        finished(sw, p)
    partial = point_dir(sw, points[2])  # killed half-way: no done marker
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text('{"step": 1}\n')
    (partial / "stale-file").write_text("from the killed run")
    assert [state(sw, p) for p in points[:4]] == ["done", "done", "partial", "new"]

    launched: list[str] = []
    ran, failed = run_sweep(sw, _fake_launcher(launched, fail={points[4].name}))
    assert launched == [p.name for p in points[2:]]
    assert [p.name for p in failed] == [points[4].name]
    assert not (partial / "stale-file").exists()  # a fresh folder for the restarted point
    record = json.loads((partial / DONE_FILE).read_text())
    assert record["steps"] == 2 and record["overrides"] == all_overrides(sw, points[2])
    assert record["overrides"][-1] == "learner.max_steps=3"
    assert not (partial / "checkpoints").exists()  # keep_weights = false
    assert [state(sw, p) for p in points] == ["done"] * 4 + ["partial"] + ["done"] * 2

    launched.clear()  # a second pass retries only the failed point
    run_sweep(sw, _fake_launcher(launched, fail=set()))
    assert launched == [points[4].name]
    assert all(state(sw, p) == "done" for p in points)


def test_dry_run_lists_states_and_commands(tmp_path, capsys):
    sw = load_sweep(write(tmp_path, EPOCHS))
    finished(sw, expand(sw)[0])
    assert sweep_cli([str(tmp_path / "sweep.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["done", "epochs=1,correction=tis,seed=0"]
    assert out[2].split() == ["new", "epochs=1,correction=tis,seed=1"]
    assert "learner.max_steps=3" in out[1] and out[1].strip().startswith("grpo-stream run")


def test_shipped_sweeps_expand(tmp_path):
    for name, n in (("epochs", 8), ("models", 4)):
        points = expand(load_sweep(ROOT / "configs" / "sweeps" / f"{name}.toml"))
        assert len(points) == n, name
