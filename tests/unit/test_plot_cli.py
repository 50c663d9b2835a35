"""`grpo-stream plot`: a PNG from metrics.jsonl; a clear error without one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from grpo_stream.analysis.plot import make_figure, read_rows, reward_band, series
from grpo_stream.analysis.plot_cli import plot_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run: Path, n: int, torn_tail: bool = False) -> None:
    run.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(1, n + 1):
        rows.append(
            {
                "step": step,
                "reward_mean": 0.2 + 0.05 * step,
                "reward_std": 0.1,
                "kl": 0.001 * step,
                "clip_frac": 0.02,
                "tokens_per_s": 900.0 + step,
                "staleness_mean": 0.5,
                "staleness_max": 1,
                "policy_version": step,
            }
        )
    rows[2]["kl"] = None  # MetricsWriter writes non-finite floats as null
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "metrics.jsonl").write_text(text + ('{"step": 99, "rew' if torn_tail else ""))


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_writes_a_png_beside_the_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_metrics(run, 12)
    assert plot_cli([str(run)]) == 0
    png = run / "plots.png"
    width, height = png_size(png)
    assert (width, height) == (1200, 640)  # 15 x 8 inches at 80 dpi
    assert 10_000 < png.stat().st_size < 2_000_000
    assert not list(run.glob(".*.tmp.png"))


def test_plot_out_option_and_a_torn_last_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_metrics(run, 3, torn_tail=True)
    out = tmp_path / "figs" / "curve.png"
    assert plot_cli([str(run), "--out", str(out)]) == 0
    assert png_size(out) == (1200, 640)
    assert [r["step"] for r in read_rows(run)] == [1, 2, 3]


def test_series_skips_missing_and_non_finite_values(tmp_path: Path) -> None:
    rows = [{"step": 1, "kl": 0.1}, {"step": 2, "kl": None}, {"step": 3}, {"step": 4, "kl": 0.3}]
    rows.append({"step": 5, "kl": math.nan})
    assert series(rows, "kl") == ([1.0, 4.0], [0.1, 0.3])


def test_missing_metrics_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert plot_cli([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and str(tmp_path) in err
    assert not (tmp_path / "plots.png").exists()
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_cli([str(tmp_path)]) == 2
    assert "no steps" in capsys.readouterr().err


def test_integer_step_ticks_and_a_band_inside_the_reward_range() -> None:
    # rewards in [0, 1]: mean ± std would reach -0.2 and 1.2
    rows = [
        {"step": s, "reward_mean": m, "reward_std": 0.3, "reward_min": 0.0, "reward_max": 1.0}
        for s, m in ((1, 0.1), (2, 0.5), (3, 0.9))
    ]
    xs, lo, hi = reward_band(rows)
    assert xs == [1.0, 2.0, 3.0]
    assert lo == pytest.approx([0.0, 0.2, 0.6]) and hi == pytest.approx([0.4, 0.8, 1.0])
    fig = make_figure(rows)
    fig.canvas.draw()
    reward_ax = fig.axes[0]
    (band,) = reward_ax.collections
    y = band.get_paths()[0].vertices[:, 1]
    assert y.min() >= 0.0 and y.max() <= 1.0
    for ax in fig.axes[:6]:  # three steps: matplotlib alone would tick 1.0, 1.25, ...
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(t == int(t) for t in ticks), ticks
