"""The models a run keeps resident and their parameter counts: `RUN/models.json`.

    write_models(run_dir, resident_models(cfg, model, ref, critic))   # rank 0, at start

PPO holds four models (actor, critic, reference, reward model); GRPO drops the critic,
beta = 0 the reference, a rule reward the reward model. The learner writes which ones
this run holds, where each lives (the learner, or the reward server), and how many
parameters each has, so `grpo-stream compare` can put the cost of each model beside what
it buys. The reward model's count comes from its safetensors headers (the learner never
loads it); the others from the live modules (FSDP2: the global count).

    {"actor": {"where": "learner", "params": 134515008}, "critic": {...}, ...}
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from grpo_stream.core.atomic import atomic_write

MODELS_FILE = "models.json"


def module_params(module) -> int:
    """Parameters of a module (a DTensor counts its global shape), shared tensors once."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def safetensors_params(folder: str | Path) -> int:
    """Parameters stored in a folder's *.safetensors files, from their JSON headers."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def resident_models(cfg, model, ref, critic) -> dict[str, dict]:
    """name -> {"where", "params"} for every model this run holds."""
    out = {"actor": {"where": "learner", "params": module_params(model)}}
    if ref is not None:
        out["reference"] = {"where": "learner", "params": module_params(ref)}
    if critic is not None:
        out["critic"] = {"where": "learner", "params": module_params(critic.model)}
    if any(f.name == "reward_model" for f in cfg.reward.functions) and cfg.reward_model.path:
        try:
            n = safetensors_params(cfg.reward_model.path)
        except (OSError, ValueError):  # a folder elsewhere (a remote server's): unknown here
            n = None
        out["reward_model"] = {"where": "reward server", "params": n}
    return out


def write_models(run_dir: str, models: dict[str, dict]) -> None:
    atomic_write(Path(run_dir) / MODELS_FILE, json.dumps(models, indent=1) + "\n")
