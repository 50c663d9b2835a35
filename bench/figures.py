"""Shared by bench/pipeline.py, bench/simulate.py and bench/choices.py: the figure record
of DESIGN.md, the machine description, and the run tables appended to bench/RESULTS.md
(a benchmark appends its runs there, below the index of figures; a person edits only
that index).

    fig = figure("async_vs_sync_speedup", 2.9, "x", ">=", 2.77)
    write_result(path, [fig], config)           # {"figures", "machine", "config"}
    append_results_md(md, "title", table_lines, config)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def figure(name: str, value: float, unit: str, op: str, goal: float) -> dict:
    ok = value >= goal if op == ">=" else value <= goal
    return {"name": name, "value": round(float(value), 4), "unit": unit, "op": op,
            "goal": goal, "ok": bool(ok)}  # fmt: skip


def machine() -> dict:
    out = {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        out["load_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def write_result(path: Path, figures: list[dict], config: dict) -> dict:
    result = {"figures": figures, "machine": machine(), "config": config}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def append_results_md(md: Path, title: str, lines: list[str], result: dict) -> None:
    """Append `title`, the table `lines`, the figures, machine and config to `md`."""
    figs = [f"- {f['name']}: {f['value']} {f['unit']} (goal {f['op']} {f['goal']}: "
            f"{'ok' if f['ok'] else 'NOT MET'})" for f in result["figures"]]  # fmt: skip
    block = [f"## {title} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             *lines, "", *figs, "", f"machine: `{json.dumps(result['machine'])}`", "",
             f"config: `{json.dumps(result['config'])}`", "",
             f"command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`", ""]  # fmt: skip
    if not md.exists():
        md.write_text("# Benchmark results\n\nWritten by the benchmarks themselves "
                      "(bench/pipeline.py, bench/simulate.py); newest last.\n\n")  # fmt: skip
    with open(md, "a") as f:
        f.write("\n".join(block) + "\n")
