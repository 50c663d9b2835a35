"""bench/learner.py and bench/lora.py share bench/results/learner.json: a rerun of one
part keeps the other's figures, their details and the file's machine line."""

from __future__ import annotations

import json

import bench.learner as bl


def _fig(name: str, value: float) -> dict:
    return bl.figure(name, value, "x", "<=", 1.0)


def test_a_lora_rerun_keeps_the_learners_figures_and_replaces_its_own(tmp_path, monkeypatch):
    path = tmp_path / "learner.json"
    monkeypatch.setattr(bl, "RESULTS", path)
    path.write_text(json.dumps({
        "figures": [_fig("sync_pause_s", 0.9), _fig("lora_sync_pause_ratio", 0.5)],
        "machine": "x86_64 2 cpus, 2 torch threads",
        "config": {"sync": {"pushes": 3}, "lora_sync": {"pushes": 1}},
    }))  # fmt: skip
    out = bl.merge_results({"figures": [_fig("lora_sync_pause_ratio", 0.1)],
                            "config": {"lora_sync": {"pushes": 3}}})  # fmt: skip
    assert [(f["name"], f["value"]) for f in out["figures"]] == [
        ("sync_pause_s", 0.9), ("lora_sync_pause_ratio", 0.1)]  # fmt: skip
    assert out["machine"] == "x86_64 2 cpus, 2 torch threads"
    assert out["config"] == {"sync": {"pushes": 3}, "lora_sync": {"pushes": 3}}


def test_a_missing_or_corrupt_file_starts_afresh(tmp_path, monkeypatch):
    monkeypatch.setattr(bl, "RESULTS", tmp_path / "learner.json")
    new = {"figures": [_fig("lora_step_time_ratio", 0.8)], "config": {}}
    assert bl.merge_results(new) == new
    (tmp_path / "learner.json").write_text("{not json")
    assert bl.merge_results(new) == new
