"""The PNGs of `grpo-stream compare` (matplotlib, Agg backend: no display needed).

    paths = plot_comparison(runs, settings, threshold, out_dir)

`curves.png`: trailing-mean reward against trained samples and against wall time (the
threshold dashed), held-out accuracy against both (when a run has eval.jsonl), the
approximate KL(pi_old || pi_theta) and the KL to the reference against trained samples.
`diagnostics.png`: the clip fraction per epoch index (bars per setting), the
behaviour/proximal mismatch (mean |log pi_old - log pi_b|) and the TIS-truncated
fraction against trained samples, the median time per step and the peak learner memory
per setting (bars, one dot per seed). One colour per setting, one line style per seed.
"""

from __future__ import annotations

from pathlib import Path

from grpo_stream.analysis.compare import Run, Setting, eval_points
from grpo_stream.core import metric_names as M

STYLES = ["-", "--", ":", "-."]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(settings: list[Setting]) -> dict[str, str]:
    return {s.name: f"C{i % 10}" for i, s in enumerate(settings)}


def _lines(ax, runs: list[Run], colours, xy, title: str, xlabel: str) -> None:
    drawn = 0
    for i, r in enumerate(runs):
        xs, ys = xy(r)
        if not xs:
            continue
        style = STYLES[i % len(STYLES)] if r.seed is None else STYLES[int(r.seed) % len(STYLES)]
        ax.plot(xs, ys, style, color=colours[r.setting], marker=".", label=r.name)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)


def _metric(key: str):
    def xy(r: Run):
        pts = [(s, row[key]) for s, row in zip(r.samples, r.rows, strict=True)
               if isinstance(row.get(key), int | float)]  # fmt: skip
        return [p[0] for p in pts], [p[1] for p in pts]

    return xy


def _bars(ax, settings: list[Setting], colours, key: str, title: str) -> None:
    for i, s in enumerate(settings):
        xs = s.values(key)
        if xs:
            ax.bar(i, sum(xs) / len(xs), color=colours[s.name], alpha=0.6)
            ax.plot([i] * len(xs), xs, "k.", markersize=4)
    ax.set_xticks(range(len(settings)), [s.name for s in settings], rotation=30, ha="right",
                  fontsize=6)  # fmt: skip
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def _clip_bars(ax, settings: list[Setting], colours) -> None:
    width = 0.8 / max(1, len(settings))
    for i, s in enumerate(settings):
        per: dict[int, list[float]] = {}
        for r in s.runs:
            for e, v in r.stats["clip_epoch"].items():
                if v is not None:
                    per.setdefault(e, []).append(v)
        es = sorted(per)
        ax.bar([e + (i - len(settings) / 2 + 0.5) * width for e in es],
               [sum(per[e]) / len(per[e]) for e in es], width, color=colours[s.name],
               label=s.name)  # fmt: skip
    epochs = sorted({e for s in settings for r in s.runs for e in r.stats["clip_epoch"]})
    ax.set_xticks(epochs)
    ax.set_title("clip fraction per epoch index", fontsize=9)
    ax.set_xlabel("epoch within the learner step", fontsize=8)
    ax.tick_params(labelsize=7)


def _curves(plt, runs, settings, colours, threshold: float, out: Path) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    _lines(axes[0, 0], runs, colours, lambda r: (r.samples, r.smooth),
           "reward (trailing mean) vs trained samples", "trained samples")  # fmt: skip
    _lines(axes[0, 1], runs, colours, lambda r: (r.wall, r.smooth),
           "reward (trailing mean) vs learner wall time", "seconds")  # fmt: skip
    for ax in axes[0, :2]:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)

    def held_out(r: Run):
        pts = eval_points(r)
        return [p[0] for p in pts], [p[2] for p in pts]

    def held_out_wall(r: Run):
        pts = eval_points(r)
        return [p[1] for p in pts], [p[2] for p in pts]

    _lines(axes[1, 0], runs, colours, held_out, "held-out accuracy vs trained samples",
           "trained samples")  # fmt: skip
    _lines(axes[1, 1], runs, colours, held_out_wall, "held-out accuracy vs learner wall time",
           "seconds")  # fmt: skip
    _lines(axes[0, 2], runs, colours, _metric(M.APPROX_KL_PROXIMAL),
           "approx KL(π_old‖π_θ) vs trained samples", "trained samples")  # fmt: skip
    _lines(axes[1, 2], runs, colours, _metric(M.KL_REF),
           "KL to the reference (loss.beta > 0) vs samples", "trained samples")  # fmt: skip
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _diagnostics(plt, runs, settings, colours, out: Path) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    _clip_bars(axes[0, 0], settings, colours)
    axes[0, 0].legend(fontsize=6)
    _lines(axes[0, 1], runs, colours, _metric(M.BEHAVIOUR_LOGPROB_ABS_DIFF),
           "mean |log π_old − log π_b| vs samples", "trained samples")  # fmt: skip
    _lines(axes[0, 2], runs, colours, _metric(M.TIS_TRUNCATED_FRAC),
           "TIS-truncated token fraction vs samples", "trained samples")  # fmt: skip
    _lines(axes[1, 0], runs, colours, _metric(M.CLIP_FRAC),
           "clip fraction (all epochs) vs samples", "trained samples")  # fmt: skip
    _bars(axes[1, 1], settings, colours, "s_per_step", "learner seconds per step (median)")
    _bars(axes[1, 2], settings, colours, "peak_mb", "learner peak memory (MB)")
    fig.tight_layout()
    path = out / "diagnostics.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_comparison(runs: list[Run], settings: list[Setting], threshold: float, out: Path):
    """Writes curves.png and diagnostics.png into `out`; returns their paths."""
    plt = _plt()
    colours = _colours(settings)
    return [_curves(plt, runs, settings, colours, threshold, out),
            _diagnostics(plt, runs, settings, colours, out)]  # fmt: skip
