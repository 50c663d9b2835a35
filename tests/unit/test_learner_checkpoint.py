"""Checkpoint trainer state: the optimizer state's format must match the learner that
loads it (one process: torch's per-index state; FSDP: a full per-name state dict)."""

from __future__ import annotations

import pytest
import torch

from grpo_stream.learner.checkpoint import load_trainer_state, save_checkpoint


class _Tiny(torch.nn.Linear):
    def save_pretrained(self, path, safe_serialization=True, state_dict=None):
        path.mkdir(parents=True)
        torch.save(self.state_dict() if state_dict is None else state_dict, path / "w.pt")


def _trained():
    torch.manual_seed(0)
    model = _Tiny(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_one_process_round_trip(tmp_path):
    model, opt, sched = _trained()
    ckpt = save_checkpoint(str(tmp_path), 3, model, opt, sched, {"version": 3, "cursor": {}})
    _, opt2, sched2 = _trained()
    for group in opt2.param_groups:
        group["lr"] = 7.0
    state = load_trainer_state(ckpt, opt2, sched2)
    assert state["step"] == 3 and state["version"] == 3
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)  # 0.1 / (1 + 1)
    torch.testing.assert_close(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_full_state_round_trip_and_format_mismatch_names_the_file(tmp_path):
    model, opt, sched = _trained()
    full = {"state": {"weight": {"step": torch.tensor(1.0)}}, "param_groups": []}
    ckpt = save_checkpoint(str(tmp_path), 1, model, opt, sched, {"version": 1, "cursor": {}},
                           optimizer_state=full)  # fmt: skip
    got = []
    load_trainer_state(ckpt, opt, sched, load_optimizer=got.append)
    assert got[0]["state"]["weight"]["step"] == 1.0
    with pytest.raises(ValueError, match=r"trainer.pt: optimizer state in format 'full_state"):
        load_trainer_state(ckpt, opt, sched)  # a one-process learner on an FSDP checkpoint
    plain = save_checkpoint(str(tmp_path), 2, model, opt, sched, {"version": 2, "cursor": {}})
    with pytest.raises(ValueError, match="same number of processes"):
        load_trainer_state(plain, opt, sched, load_optimizer=got.append)
