"""Atomic learner checkpoints: model, optimizer, scheduler, RNG, step, buffer cursor.

`RUN/checkpoints/step-N/` holds `model/` (Hugging Face format, loadable with
`from_pretrained`), `trainer.pt` (optimizer, scheduler, RNG states) and `state.json`
(step, policy version, cursor). It is written to `step-N.tmp` and renamed, so a
killed learner leaves either a whole checkpoint or none. `latest_checkpoint` finds
the newest whole one for `--resume`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str,
    step: int,
    model,
    optimizer,
    scheduler,
    state: dict,
    keep: int = 2,
    state_dict: dict | None = None,
) -> Path:
    """`state_dict`: full weights gathered from FSDP shards; the optimizer state of a
    sharded run is not saved (resuming under torchrun is not supported yet)."""
    root = Path(run_dir) / "checkpoints"
    out = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
    torch.save(
        {
            "optimizer": optimizer.state_dict() if state_dict is None else None,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        },
        tmp / "trainer.pt",
    )
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    _fsync_tree(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def list_checkpoints(run_dir: str) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt: Path, optimizer, scheduler) -> dict:
    blob = torch.load(ckpt / "trainer.pt", weights_only=False)
    if blob["optimizer"] is not None:  # None: written by a sharded (torchrun) learner
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((ckpt / "state.json").read_text())
