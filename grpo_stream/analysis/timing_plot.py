"""`grpo-stream plot` draws where the time went: `RUN/timing.png`.

Two panels from `grpo_stream.run.timing_summary`: the learner's step phases stacked per step
(wait, proximal, train, gather, eval wait, sync, checkpoint: the bar's height is the
step's time), and each process's share of its life (learner, generator, every server:
busy / paused / idle), the utilisation and idle ratios of the end-of-run summary.

    plot_timing(run_dir)   # -> RUN/timing.png, or None without metrics
"""

from __future__ import annotations

from pathlib import Path

from grpo_stream.analysis.plot import read_rows
from grpo_stream.core import metric_names as M
from grpo_stream.core.atomic import atomic_target
from grpo_stream.core.timing import STEP_PHASES
from grpo_stream.run.timing_summary import run_times


def _shares(t: dict) -> list[tuple[str, float, float, float]]:
    """(process, busy, paused, idle) shares of each process's life."""
    out = []
    if lrn := t.get("learner"):
        out.append(("learner", lrn["utilisation"], 0.0, lrn["idle_ratio"]))
    if gen := t.get("generator"):
        out.append(("generator", 1 - gen["idle_ratio"], 0.0, gen["idle_ratio"]))
        life = gen["wall_s"] or 1e-9
        for i, (_url, s) in enumerate(gen["servers"].items()):
            out.append((f"server {i}", s["busy_s"] / life, s["paused_s"] / life,
                        s["idle_s"] / life))  # fmt: skip
    return out


def plot_timing(run_dir: Path, out: Path | None = None) -> Path | None:
    """Draw RUN/timing.png; None when the run has no metrics rows."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return None
    rows = read_rows(Path(run_dir))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    steps = [r.get(M.STEP, i + 1) for i, r in enumerate(rows)]
    bottom = [0.0] * len(rows)
    for k in STEP_PHASES:
        ys = [float(r.get(k) or 0.0) for r in rows]
        if any(ys):
            a.bar(steps, ys, bottom=bottom, label=k.removesuffix("_s"))
            bottom = [x + y for x, y in zip(bottom, ys, strict=True)]
    a.plot(steps, [r.get(M.STEP_S) or 0 for r in rows], "k.", label="step_s")
    a.set(title="learner step phases", xlabel="step", ylabel="seconds")
    a.legend(fontsize=8)
    shares = _shares(run_times(str(run_dir)))
    names = [s[0] for s in shares]
    left = [0.0] * len(shares)
    for j, (label, color) in enumerate((("busy", "tab:green"), ("paused for sync", "tab:orange"),
                                        ("idle", "tab:gray")), start=1):  # fmt: skip
        w = [s[j] for s in shares]
        b.barh(names, w, left=left, label=label, color=color)
        left = [x + y for x, y in zip(left, w, strict=True)]
    b.set(title="utilisation per process", xlabel="share of its life", xlim=(0, 1))
    b.legend(fontsize=8)
    fig.tight_layout()
    out = out or Path(run_dir) / "timing.png"
    with atomic_target(out, ".png") as tmp:  # a viewer never sees half a PNG
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return out
