"""The Markdown table, the JSON summary and the conclusion of `grpo-stream compare`.

    md = markdown_report(title, runs, settings, threshold, window, ["curves.png"])
    data = summary_json(runs, settings, threshold)
    lines = conclusion(settings, threshold)

The conclusion is generated from the numbers: for the final reward and for the samples
to reach the threshold it names the best and the worst setting, and compares the
difference of their means with the largest seed spread (max - min over one setting's
seeds). When the spread is at least the difference it says "seeds disagree more than
settings differ"; with one seed per setting it says the spread is unknown. Where two
settings or more were evaluated, the held-out accuracy gets the same verdict; and where
the settings score with different `reward.functions`, it says that their rewards are not
comparable and the held-out accuracy is the measure to read.
"""

from __future__ import annotations

import json

from grpo_stream.analysis.compare import Run, Setting, fmt

# (stats key, what it is, which way is better: +1 higher, -1 lower)
COMPARED = [("final_reward", "final reward", +1), ("samples_to_threshold", "samples to the threshold", -1)]  # fmt: skip


def _pm(summary: dict | None, digits: int = 3, what: str = "runs") -> str:
    if summary is None:
        return "-"
    text = fmt(summary["mean"], digits)
    if summary["std"] is not None:
        text += f" ± {fmt(summary['std'], digits)}"
    if summary["n"] < summary["of"]:
        text += f" ({summary['n']}/{summary['of']} {what})"
    return text


def _clip(per_epoch: dict) -> str:
    return " / ".join(fmt(v) for _, v in sorted(per_epoch.items())) or "-"


def _setting_clip(s: Setting) -> dict:
    epochs = sorted({e for r in s.runs for e in r.stats["clip_epoch"]})
    out = {}
    for e in epochs:
        xs = [r.stats["clip_epoch"][e] for r in s.runs if r.stats["clip_epoch"].get(e) is not None]
        out[e] = sum(xs) / len(xs) if xs else None
    return out


def _mean(s: Setting, key: str):
    xs = s.values(key)
    return sum(xs) / len(xs) if xs else None


def settings_table(settings: list[Setting], threshold: float) -> list[str]:
    lines = [
        f"| setting | seeds | steps | samples | final reward | samples to {fmt(threshold)} | "
        "held-out | clip frac per epoch (1 / 2 / ...) | KL(π_old‖π_θ) | \\|log π_old − log π_b\\| "
        "| TIS truncated | s/step | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        seeds = ",".join(str(r.seed) for r in s.runs)
        cells = [s.name, seeds, fmt(_mean(s, "steps"), 1), fmt(_mean(s, "samples"), 0),
                 _pm(s.summary("final_reward")), _pm(s.summary("samples_to_threshold"), 0, "reached"),
                 _pm(s.summary("eval")), _clip(_setting_clip(s)),
                 fmt(_mean(s, "approx_kl"), 5), fmt(_mean(s, "logprob_abs_diff"), 4),
                 fmt(_mean(s, "tis_truncated"), 4), fmt(_mean(s, "s_per_step"), 1),
                 fmt(_mean(s, "peak_mb"), 0)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def runs_table(runs: list[Run]) -> list[str]:
    lines = [
        "| run | seed | steps | samples | wall s | final reward | samples to threshold | "
        "held-out | clip per epoch | KL | \\|Δlog π\\| | TIS trunc | s/step | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        st = r.stats
        stt = st["samples_to_threshold"]
        cells = [r.name, str(r.seed), str(st["steps"]), fmt(st["samples"], 0),
                 fmt(st["wall_s"], 0), fmt(st["final_reward"]),
                 fmt(stt, 0) if stt is not None else f"> {fmt(st['samples'], 0)}",
                 fmt(st["eval"]), _clip(st["clip_epoch"]), fmt(st["approx_kl"], 5),
                 fmt(st["logprob_abs_diff"], 4), fmt(st["tis_truncated"], 4),
                 fmt(st["s_per_step"], 1), fmt(st["peak_mb"], 0)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _spreads(settings: list[Setting], key: str) -> list[float]:
    """Each multi-seed setting's seed spread (max - min). A seed that never reached the
    threshold counts as its run's total samples: a lower bound of its value."""
    out = []
    for s in settings:
        x = s.summary(key)
        if x is None or len(s.runs) < 2:
            continue
        if x["n"] < x["of"]:  # some seeds got there, others not within the budget
            out.append(max(r.stats["samples"] for r in s.runs) - min(s.values(key)))
        elif x["n"] > 1:
            out.append(x["spread"])
    return out


def _verdict(settings: list[Setting], key: str, what: str, sign: int, digits: int) -> str:
    sums = {s.name: s.summary(key) for s in settings}
    have = {n: x for n, x in sums.items() if x is not None}
    missing = [n for n, x in sums.items() if x is None]
    note = f" ({', '.join(missing)}: no run got there)" if missing else ""
    if len(have) < 2:
        return f"On the {what}, fewer than two settings have a value{note}: nothing to compare."
    ranked = sorted(have, key=lambda n: sign * have[n]["mean"], reverse=True)
    best, worst = ranked[0], ranked[-1]
    diff = abs(have[best]["mean"] - have[worst]["mean"])
    unit = "reached" if key == "samples_to_threshold" else "runs"
    head = (f"On the {what}, the best setting is `{best}` ({_pm(have[best], digits, unit)}) and "
            f"the worst `{worst}` ({_pm(have[worst], digits, unit)}): a difference of "
            f"{fmt(diff, digits)}")  # fmt: skip
    spreads = _spreads(settings, key)
    if not spreads:
        return (head + f"{note}; one seed per setting, so the seed spread is unknown and the "
                "ranking unproven.")  # fmt: skip
    spread = max(spreads)
    if spread >= diff:
        return (head + f", but the seeds of one setting differ by up to {fmt(spread, digits)}: "
                f"**seeds disagree more than settings differ**, so these runs do not rank the "
                f"settings{note}.")  # fmt: skip
    n = min(len(s.runs) for s in settings)
    return (head + f", larger than the largest seed spread ({fmt(spread, digits)}); with "
            f"{n} seed(s) per setting this is weak evidence{note}.")  # fmt: skip


def _reward_definitions(settings: list[Setting]) -> int:
    """How many different `reward.functions` the settings' runs score with."""
    return len({json.dumps(r.config.get("reward.functions"), sort_keys=True)
                for s in settings for r in s.runs})  # fmt: skip


def conclusion(settings: list[Setting], threshold: float) -> list[str]:
    """The verdicts: final reward, samples to `threshold`, and the held-out accuracy where
    two settings or more were evaluated; a warning when the rewards are not comparable."""
    if len(settings) < 2:
        return ["One setting only: nothing to compare."]
    out = [
        _verdict(settings, "final_reward", "final reward", +1, 3),
        _verdict(
            settings, "samples_to_threshold", f"samples to reach reward {fmt(threshold)}", -1, 0
        ),
    ]
    if sum(s.summary("eval") is not None for s in settings) >= 2:
        out.append(_verdict(settings, "eval", "held-out accuracy (last evaluation)", +1, 3))
    if _reward_definitions(settings) > 1:
        out.append("**The settings score with different `reward.functions`**, so their rewards "
                   "are on different scales and the two reward verdicts compare unlike "
                   "numbers; the held-out accuracy, scored alike for all, is the one to "
                   "read.")  # fmt: skip
    return out


def markdown_report(title: str, runs: list[Run], settings: list[Setting], threshold: float,
                    window: int, images: list[str]) -> str:  # fmt: skip
    seeds = sorted({str(r.seed) for r in runs})
    lines = [
        f"## {title}",
        "",
        f"{len(runs)} runs in {len(settings)} settings (seeds {', '.join(seeds)}). Rewards are "
        f"trailing means over {window} steps; *final reward* is the last one; *samples to "
        f"{fmt(threshold)}* counts the trained samples up to the first step whose trailing "
        "mean reached it (mean ± std over seeds). Clip fraction and KL are means over steps; "
        "epoch 1 runs on the proximal weights, so its clip fraction is 0. Time is the "
        "learner's per step (median); memory its process peak.",
        "",
        *settings_table(settings, threshold),
        "",
        *_with_blank(models_table(settings, threshold)),
        "**Conclusion.** " + " ".join(conclusion(settings, threshold)),
        "",
        "<details><summary>Per run</summary>",
        "",
        *runs_table(runs),
        "",
        "</details>",
        "",
        *[f"![{name.removesuffix('.png')}]({name})" for name in images],
        "",
    ]
    return "\n".join(lines)


def _with_blank(lines: list[str]) -> list[str]:
    return [*lines, ""] if lines else []


def summary_json(runs: list[Run], settings: list[Setting], threshold: float) -> dict:
    keys = ("final_reward", "samples_to_threshold", "eval", "approx_kl", "logprob_abs_diff",
            "tis_truncated", "s_per_step", "peak_mb", "samples", "steps",
            "reward_server_mb")  # fmt: skip
    return {
        "threshold": threshold,
        "runs": [
            {"path": str(r.path), "name": r.name, "setting": r.setting, "seed": r.seed, **r.stats}
            for r in runs
        ],  # fmt: skip
        "settings": [
            {
                "name": s.name,
                "runs": [r.name for r in s.runs],
                **{k: s.summary(k) for k in keys},
                "clip_epoch": _setting_clip(s),
                "models": s.runs[0].stats.get("models"),
                "params_m": s.runs[0].stats.get("params_m"),
            }
            for s in settings
        ],  # fmt: skip
        "conclusion": conclusion(settings, threshold),
    }


def _params_cell(params: dict) -> str:
    return ", ".join(f"{n} {fmt(p, 1)}" for n, p in params.items()) or "-"


def _means(s: Setting):
    def mean(key: str):
        xs = s.values(key)
        return sum(xs) / len(xs) if xs else None

    return mean


def models_table(settings: list[Setting], threshold: float) -> list[str]:
    """One row per setting (means over its seeds); [] when no run recorded its models."""
    if not any(r.stats.get("models") for s in settings for r in s.runs):
        return []
    lines = [
        f"| setting | models resident | parameters (M) | learner peak MB | reward server MB "
        f"| s/step | samples to {fmt(threshold)} | held-out pass@1 (rule) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        first = s.runs[0].stats
        reached = s.values("samples_to_threshold")
        mean = _means(s)
        stt = fmt(mean("samples_to_threshold"), 0) if reached else "not reached"
        cells = [s.name, first.get("models") or "-", _params_cell(first.get("params_m") or {}),
                 fmt(mean("peak_mb"), 0), fmt(mean("reward_server_mb"), 0),
                 fmt(mean("s_per_step"), 1), f"{stt} ({len(reached)}/{len(s.runs)})",
                 fmt(mean("eval"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines
