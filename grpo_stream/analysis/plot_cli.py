"""`grpo-stream plot RUN_DIR [--out FILE.png]`: a run's curves, step phases and evaluation.

    grpo-stream plot runs/grpo-20250101-120000

Writes RUN_DIR/plots.png (`plot.py`), the step phases and utilisation (`timing_plot.py`)
and, when the run evaluated, the held-out curves (`grpo_stream.eval.plot`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpo_stream.analysis.plot import plot_metrics, read_rows
from grpo_stream.analysis.timing_plot import plot_timing
from grpo_stream.eval.plot import plot_eval


def plot_cli(argv: list[str]) -> int:
    """`grpo-stream plot RUN_DIR [--out FILE.png]`; 2 when there is nothing to plot."""
    p = argparse.ArgumentParser(
        prog="grpo-stream plot", description="training curves from RUN_DIR/metrics.jsonl"
    )
    p.add_argument("run_dir", type=Path, help="a run folder with metrics.jsonl")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/plots.png)")
    args = p.parse_args(argv)
    try:
        rows = read_rows(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"grpo-stream plot: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"grpo-stream plot: {args.run_dir}/metrics.jsonl has no steps yet", file=sys.stderr)
        return 2
    out = plot_metrics(rows, args.out or args.run_dir / "plots.png", title=args.run_dir.name)
    print(f"[plot] {len(rows)} steps → {out}")
    if (timing_out := plot_timing(args.run_dir)) is not None:
        print(f"[plot] step phases and utilisation → {timing_out}")
    if (eval_out := plot_eval(args.run_dir)) is not None:
        print(f"[plot] held-out evaluation → {eval_out}")
    return 0
