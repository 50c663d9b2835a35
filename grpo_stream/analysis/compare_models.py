"""What each model costs: the models a run held, their sizes, the reward servers' memory.

    costs = read_costs(run_dir)          # run_stats merges it into each run's stats
    # compare_table.models_table(settings, threshold) puts them in a table

A run folder's `models.json` (written by the learner: `learner.models_info`) names the
models the run held (actor, reference, critic, reward model) and their parameter counts;
`reward_servers.json` (written by `run` when it stopped its reward servers:
`run.rm_keeper`) their peak resident memory. The table puts them beside the learner's
peak memory, time per step, samples to the reward threshold and the held-out greedy
pass@1, which `eval.reward` scores by the rule in every setting, so settings trained on
different rewards are compared on one scale. Runs from before these files show "-".
"""

from __future__ import annotations

import json
from pathlib import Path

MODELS_FILE = "models.json"  # learner.models_info.MODELS_FILE (analysis cannot import learner)
REWARD_SERVERS_FILE = "reward_servers.json"  # run.rm_keeper.REWARD_SERVERS_FILE
ORDER = ("actor", "critic", "reference", "reward_model")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_costs(run_dir: Path) -> dict:
    """{"models": "actor+critic+...", "params_m": {name: millions}, "reward_server_mb"}."""
    models = _read_json(Path(run_dir) / MODELS_FILE) or {}
    names = [n for n in ORDER if n in models] + sorted(set(models) - set(ORDER))
    params = {n: (models[n].get("params") or 0) / 1e6 or None for n in names}
    servers = _read_json(Path(run_dir) / REWARD_SERVERS_FILE) or {}
    peaks = [p for p in servers.get("peak_rss_mb", []) if p is not None]
    return {
        "models": "+".join(names) or None,
        "params_m": params,
        "reward_server_mb": sum(peaks) if peaks else None,
    }
