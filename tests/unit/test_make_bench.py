"""`make bench` runs every benchmark in bench/ (the README's promise), and the GPU smoke
test, which needs CUDA, skips cleanly where there is none instead of failing the target."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def runnable_benches() -> set[str]:
    """bench/NAME.py modules with a `__main__` block (the others are their helpers)."""
    return {
        p.stem
        for p in (ROOT / "bench").glob("*.py")
        if 'if __name__ == "__main__":' in p.read_text()
    }


def test_make_bench_runs_every_benchmark():
    benches = runnable_benches()
    assert {"learner", "pipeline", "simulate", "gpu_smoke"} <= benches  # the scan sees them
    # -n prints the commands without running them (nor the env target's set-up)
    out = subprocess.run(["make", "-n", "bench", f"VENV={sys.prefix}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    ran = re.findall(r"-m bench\.(\w+)", out)
    assert sorted(ran) == sorted(benches)
    assert re.search(r"-m bench\.gpu_smoke --if-cuda\b", out)
    readme = (ROOT / "README.md").read_text()
    sentence = readme[readme.index("`make bench` runs every benchmark") :].split("\n\n")[0]
    assert [b for b in sorted(benches) if f"`{b}`" not in sentence] == []


def test_gpu_smoke_without_cuda_skips_in_one_line_under_make_bench():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.gpu_smoke"]
    skipped = subprocess.run([*cmd, "--if-cuda"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.strip().splitlines() == [
        "bench.gpu_smoke: skipped, no CUDA device here "
        "(`python -m bench.gpu_smoke --device cpu` runs its small CPU check)"
    ]
    asked = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert asked.returncode == 1 and "no CUDA device" in asked.stderr  # run by hand: an error
