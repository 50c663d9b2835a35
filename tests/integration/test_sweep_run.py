"""`grpo-stream sweep` end to end on the tiny model: a 2-point grid (learner.epochs 1 and
2) with a 16-sample budget (2 steps of 2 groups x 4) runs `grpo-stream run` twice
against a real vLLM CPU server, leaves two finished run folders, and the comparison
(table and PNGs); a second `sweep` finds both points done and runs nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_stream.core import metric_names as M

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]


def test_two_point_sweep_and_its_comparison(tmp_path, tiny_model_dir, tiny_server):
    out = tmp_path / "sweep"
    sweep = tmp_path / "tiny-sweep.toml"
    sweep.write_text(f"""
[sweep]
base = "{ROOT / "configs" / "tiny.toml"}"
out_dir = "{out}"
overrides = ['server.urls=["{tiny_server.url}"]', "model.path={tiny_model_dir}",
             "sync.transport='none'", "learner.micro_batch_size=4", "learner.checkpoint_every=0",
             "learner.num_threads=1"]
doc = "{tmp_path / "docs" / "experiments.md"}"
title = "Tiny epochs"
[sweep.budget]
samples = 16
[[sweep.grid]]
"learner.epochs" = [1, 2]
""")
    argv = [sys.executable, "-m", "grpo_stream.cli", "sweep", str(sweep)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for mu in (1, 2):
        rd = out / f"epochs={mu}"
        assert json.loads((rd / "sweep_done.json").read_text())["steps"] == 2
        rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
        assert [r[M.STEP] for r in rows] == [1, 2] and all(r[M.SAMPLES] == 8 for r in rows)
        assert all(r[M.clip_frac_epoch(1)] == 0.0 for r in rows)
        assert all((M.clip_frac_epoch(2) in r) == (mu == 2) for r in rows)
        assert all(r[M.PEAK_MEMORY_MB] > 0 for r in rows)
        assert not (rd / "checkpoints").exists()  # keep_weights = false
    md = (out / "compare" / "compare.md").read_text()
    assert "| epochs=1 | 0 | 2.0 | 16 |" in md and "| epochs=2 | 0 | 2.0 | 16 |" in md
    assert "One setting only" not in md
    for png in ("curves.png", "diagnostics.png"):
        assert (out / "compare" / png).read_bytes()[:4] == b"\x89PNG"

    doc = (tmp_path / "docs" / "experiments.md").read_text()  # its section, named by the file
    assert "<!-- compare:tiny-sweep -->" in doc and "## Tiny epochs" in doc
    assert "](experiments/tiny-sweep/curves.png)" in doc
    assert (tmp_path / "docs" / "experiments" / "tiny-sweep" / "curves.png").is_file()

    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 points, 2 done, 0 to run" in again.stdout
