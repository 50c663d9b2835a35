"""Eval curves for `grpo-stream plot`: RUN/eval.jsonl -> RUN/eval.png.

Two panels: held-out greedy pass@1, mean@k and pass@k against the policy version, and
the same against wall time (seconds since the first evaluation), with the training
reward (metrics.jsonl, by policy version) on the first panel for comparison. Rows whose
requests saw two versions are drawn hollow. Nothing is drawn when there is no eval.jsonl.

    out = plot_eval(Path(run_dir))          # None when the run has no evaluation
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grpo_stream.core.atomic import atomic_target
from grpo_stream.eval.record import read_eval_rows

CURVES = (("greedy_pass_at_1", "pass@1 (greedy)"), ("mean_at_k", "mean@k"), ("pass_at_k", "pass@k"))


def eval_series(rows: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """(x, y) of metric `key`; x is "version" or "wall" (seconds since the first row)."""
    t0 = min((r["time"] for r in rows), default=0.0)
    xs, ys = [], []
    for r in rows:
        if isinstance(r.get(key), int | float):
            xs.append(float(r["policy_version"]) if x == "version" else r["time"] - t0)
            ys.append(float(r[key]))
    return xs, ys


def _training_reward(run_dir: Path) -> tuple[list[float], list[float]]:
    from grpo_stream.core.metrics import read_metrics

    try:
        rows = read_metrics(str(run_dir))
    except (FileNotFoundError, ValueError):
        return [], []
    pairs = [(r.get("policy_version"), r.get("reward_mean")) for r in rows]
    pairs = [(float(v), float(m)) for v, m in pairs if v is not None and m is not None]
    return [v for v, _ in pairs], [m for _, m in pairs]


def plot_eval(run_dir: Path, out: Path | None = None) -> Path | None:
    rows = read_eval_rows(str(run_dir))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, x, label in ((axes[0], "version", "policy version"), (axes[1], "wall", "seconds")):
        for key, name in CURVES:
            xs, ys = eval_series(rows, key, x)
            if xs:
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    vx, vy = _training_reward(run_dir)
    if vx:
        axes[0].plot(vx, vy, color="grey", alpha=0.6, label="training reward")
    mixed = [r for r in rows if r.get("version_mismatch")]
    if mixed:
        axes[0].scatter([r["policy_version"] for r in mixed], [0] * len(mixed), facecolors="none",
                        edgecolors="red", label="mixed versions")  # fmt: skip
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"held-out, {rows[0]['prompts']} prompts, k={rows[0]['k']}")
    axes[1].set_title("held-out over wall time")
    fig.tight_layout()
    out = out or run_dir / "eval.png"
    with atomic_target(out, ".png") as tmp:  # a viewer never sees half a PNG
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return out
