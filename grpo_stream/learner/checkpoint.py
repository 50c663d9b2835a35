"""Atomic learner checkpoints: model, optimizer, scheduler, RNG, step, buffer cursor.

`RUN/checkpoints/step-N/` holds `model/` (Hugging Face format, loadable with
`from_pretrained`; with [lora] the adapter alone, in peft's format), `trainer.pt` (optimizer, scheduler, RNG states) and `state.json`
(step, policy version, cursor). It is written to `step-N.tmp` and renamed, so a
killed learner leaves either a whole checkpoint or none. `latest_checkpoint` finds
the newest whole one for `--resume`.

    save_checkpoint(run_dir, step, model, opt, sched, state, keep=1,
                    model_files=RUN/weights/vN, with_optimizer=True)

`model_files`: a published weights folder that holds exactly this step's weights (the
disk sync's, just written): `model/` then shares its files by hard link instead of
writing the model again (a copy where links are refused). `with_optimizer=False` leaves
AdamW's state out (`learner.keep_final_optimizer`); a resume from such a checkpoint
starts the moments from zero and says so. Only the `keep` newest checkpoints stay: the
old one is deleted after the new one is published, so one whole checkpoint always is
(`keep=None`: the caller prunes later, `prune_checkpoints`).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from grpo_stream.core.atomic import fresh_dir, link_files, publish_dir
from grpo_stream.core.errors import UserError
from grpo_stream.learner.lora import is_lora
from grpo_stream.sync.lora import ADAPTER_CONFIG, ADAPTER_FILE, write_adapter

OMITTED = "omitted"  # trainer.pt's optimizer_format when AdamW's state was left out


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (a full disk); the message names the last whole one."""


def checkpoint_write_error(run_dir: str, step: int, err: BaseException) -> CheckpointWriteError:
    """One line: what failed, the free space left there, the checkpoint to resume from."""
    root = Path(run_dir) / "checkpoints"
    free = shutil.disk_usage(root if root.exists() else run_dir).free / 2**20
    last = latest_checkpoint(run_dir)
    return CheckpointWriteError(
        f"checkpoint step-{step} could not be written ({type(err).__name__}: {err}; "
        f"{free:.1f} MiB free under {root}); the last whole one is {last or 'none'}: free "
        "space, then `learn --resume` continues from it"
    )


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
    keep: int | None = 1,
    state_dict: dict | None = None,
    optimizer_state: dict | None = None,
    model_files: Path | None = None,
    with_optimizer: bool = True,
    trainer: dict | None = None,
    extra=None,
) -> Path:
    """`state_dict` / `optimizer_state`: full weights and full optimizer state (keyed by
    parameter name) gathered from FSDP shards on rank 0, or a background writer's copy
    of the weights (with LoRA the adapter's tensors alone: `learner.lora.saved_state_dict`);
    None: the model's and optimizer's own state dicts are written. `trainer`: trainer.pt's content
    taken earlier (`trainer_state`, copied by a background writer's snapshot); None: taken
    now. `extra(folder)` writes more into the folder before it is published (the critic,
    `learner.critic`). `model_files`, `with_optimizer`, `keep`: see the module docstring."""
    root = Path(run_dir) / "checkpoints"
    out = root / f"step-{step}"
    tmp = fresh_dir(root / f"step-{step}.tmp")
    if model_files is not None:
        link_files(model_files, tmp / "model")
    elif is_lora(model):  # the adapter alone (from state_dict when given): the base is
        # the initial model
        write_adapter(model, tmp / "model", state_dict)
    else:
        model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
    if trainer is None:
        trainer = trainer_state(optimizer, scheduler, optimizer_state, with_optimizer)
    torch.save(trainer, tmp / "trainer.pt")
    if extra is not None:
        extra(tmp)
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    publish_dir(tmp, out)  # fsync every file, then rename over any old step-N
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return out


def trainer_state(optimizer, scheduler, optimizer_state=None, with_optimizer=True) -> dict:
    """What trainer.pt holds: optimizer (or None), its format, scheduler and RNG states.
    Its tensors are the live ones: a writer that runs later copies them first."""
    return {
        "optimizer": _optimizer_blob(optimizer, optimizer_state, with_optimizer),
        "optimizer_format": _optimizer_format(optimizer_state, with_optimizer),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _optimizer_blob(optimizer, optimizer_state: dict | None, with_optimizer: bool):
    if not with_optimizer:
        return None
    return optimizer.state_dict() if optimizer_state is None else optimizer_state


def _optimizer_format(optimizer_state: dict | None, with_optimizer: bool) -> str:
    if not with_optimizer:
        return OMITTED
    return "torch" if optimizer_state is None else "full_state_dict"


def list_checkpoints(run_dir: str) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str) -> Path | None:
    """The newest whole checkpoint; an incomplete one (a file or weight shard missing,
    e.g. damaged after it was published) is skipped, and the learner says so."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        missing = missing_files(ckpt)
        if not missing:
            return ckpt
        print(f"[learn] checkpoint {ckpt} is incomplete (missing {', '.join(missing)}); "
              "using the one before it", file=sys.stderr, flush=True)  # fmt: skip
    return None


def missing_files(ckpt: Path) -> list[str]:
    """The files a checkpoint lacks: state.json, trainer.pt, model/config.json and every
    weight shard its index names (or model.safetensors when unsharded)."""
    if (ckpt / "model" / ADAPTER_CONFIG).is_file():  # a LoRA checkpoint: the adapter
        need = ["state.json", "trainer.pt", f"model/{ADAPTER_CONFIG}", f"model/{ADAPTER_FILE}"]
        return [n for n in need if not (ckpt / n).is_file()]
    need = ["state.json", "trainer.pt", "model/config.json"]
    index = ckpt / "model" / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            return [str(index.relative_to(ckpt)) + " (unreadable)"]
        need += [f"model/{s}" for s in shards]
    else:
        need.append("model/model.safetensors")
    return [n for n in need if not (ckpt / n).is_file()]


def load_trainer_state(ckpt: Path, optimizer, scheduler, load_optimizer=None) -> dict:
    """Restore optimizer, scheduler and RNG; returns state.json.

    `load_optimizer(full_state)`: how a sharded learner loads a full optimizer state
    (FSDP: every rank calls it, rank 0's copy is broadcast); None: `load_state_dict`.
    A checkpoint's optimizer state must match how it is loaded: one process writes
    torch's per-index format, FSDP a per-name full state dict. A checkpoint written
    without it (`OMITTED`) leaves the optimizer fresh, and the learner says so.
    """
    blob = torch.load(ckpt / "trainer.pt", weights_only=False)
    fmt = blob.get("optimizer_format", "torch")
    want = "torch" if load_optimizer is None else "full_state_dict"
    if fmt == OMITTED:
        print(f"[learn] {ckpt} holds no optimizer state (the last step's checkpoint, "
              "learner.keep_final_optimizer = false): AdamW's moments start from zero",
              file=sys.stderr, flush=True)  # fmt: skip
    elif blob["optimizer"] is None or fmt != want:
        raise ValueError(
            f"{ckpt / 'trainer.pt'}: optimizer state in format {fmt!r} "
            f"({'missing' if blob['optimizer'] is None else 'present'}), this learner needs "
            f"{want!r}: resume with the same number of processes that wrote it"
        )
    elif load_optimizer is None:
        optimizer.load_state_dict(blob["optimizer"])
    else:
        load_optimizer(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if fmt == OMITTED:  # the learning rate lives in the optimizer's groups: set it there
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    set_rng_state(blob["rng"])
    return json.loads((ckpt / "state.json").read_text())
