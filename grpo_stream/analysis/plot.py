"""Training curves from RUN_DIR/metrics.jsonl (`grpo-stream plot`, in `plot_cli.py`).

One PNG (matplotlib, Agg backend, no display needed) with six panels against the
learner step (integer ticks): reward mean with a ±std band (kept inside each step's
observed [reward_min, reward_max], so rewards in [0, 1] never show a band below 0),
KL, clip fraction, learner tokens/s, staleness (mean and max, in policy versions) and
the loss. A metric a run did not log is drawn as an empty panel that says so. Default
output: RUN_DIR/plots.png. The keys are the names in `grpo_stream.core.metric_names`.

    plot_metrics(read_rows(run_dir), run_dir / "plots.png", title=run_dir.name)
"""

from __future__ import annotations

import math
from pathlib import Path

from grpo_stream.core import jsonl
from grpo_stream.core import metric_names as M
from grpo_stream.core.atomic import atomic_target

# panel title -> (metric keys drawn as lines, y label)
PANELS: list[tuple[str, tuple[str, ...], str]] = [
    ("reward", (M.REWARD_MEAN,), "reward"),
    ("KL", (M.KL,), "KL"),
    ("clip fraction", (M.CLIP_FRAC,), "fraction of tokens"),
    ("learner throughput", (M.TOKENS_PER_S,), "tokens / s"),
    ("staleness", (M.STALENESS_MEAN, M.STALENESS_MAX), "versions"),
    ("loss", (M.LOSS,), "loss"),
]


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, skipping rows where it is missing or not finite."""
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if _number(v):
            xs.append(float(r.get(M.STEP, i + 1)))
            ys.append(float(v))
    return xs, ys


def reward_band(rows: list[dict]) -> tuple[list[float], list[float], list[float]]:
    """(steps, low, high) of reward_mean ± reward_std where both were logged, clipped to
    the step's [reward_min, reward_max] where those were logged: a band below the
    smallest reward (0 for rewards in [0, 1]) would show rewards nobody got."""
    xs, lo, hi = [], [], []
    for i, r in enumerate(rows):
        mean, std = r.get(M.REWARD_MEAN), r.get(M.REWARD_STD)
        if not (_number(mean) and _number(std)):
            continue
        low, high = mean - std, mean + std
        if _number(r.get(M.REWARD_MIN)):
            low = max(low, r[M.REWARD_MIN])
        if _number(r.get(M.REWARD_MAX)):
            high = min(high, r[M.REWARD_MAX])
        xs.append(float(r.get(M.STEP, i + 1)))
        lo.append(low)
        hi.append(high)
    return xs, lo, hi


def _reward_band(ax, rows: list[dict]) -> None:
    xs, lo, hi = reward_band(rows)
    if xs:
        ax.fill_between(xs, lo, hi, alpha=0.25, label="± std")


def draw_panel(ax, rows: list[dict], title: str, keys: tuple[str, ...], ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    drawn = 0
    for key in keys:
        xs, ys = series(rows, key)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
            drawn += 1
    if keys[0] == M.REWARD_MEAN:
        _reward_band(ax, rows)
    if not drawn:
        ax.text(
            0.5,
            0.5,
            f"no {', '.join(keys)} logged",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # learner steps are whole
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn and (len(keys) > 1 or keys[0] == M.REWARD_MEAN):
        ax.legend(fontsize=8)


def make_figure(rows: list[dict], title: str = ""):
    """The matplotlib figure of the panels for `rows` (metrics.jsonl records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    flat = list(axes.flat)
    for ax, (name, keys, ylabel) in zip(flat, PANELS, strict=False):
        draw_panel(ax, rows, name, keys, ylabel)
    for ax in flat[len(PANELS) :]:
        ax.axis("off")
    fig.suptitle(title or f"{len(rows)} learner steps")
    fig.tight_layout()
    return fig


def plot_metrics(rows: list[dict], out: Path, title: str = "") -> Path:
    """Draw the panels for `rows` (metrics.jsonl records) into the PNG `out`."""
    import matplotlib.pyplot as plt

    fig = make_figure(rows, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out, ".png") as tmp:  # a viewer never sees half a PNG
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return out


def read_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl records; a torn last line (a learner mid-write) is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)")
    return jsonl.read(path)  # a bad line before the last raises JSONLError (file:line)
