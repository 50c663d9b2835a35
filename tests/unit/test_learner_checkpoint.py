"""Checkpoint trainer state: the optimizer state's format must match the learner that
loads it (one process: torch's per-index state; FSDP: a full per-name state dict).
What a checkpoint costs on disk: one kept by default, its model sharing the published
weights' file (hard link, a copy where refused), AdamW's state left out on request."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from test_learner_loop import tiny  # noqa: F401 (fixture)

from grpo_stream.core.atomic import link_files
from grpo_stream.learner.checkpoint import (
    list_checkpoints,
    load_trainer_state,
    missing_files,
    save_checkpoint,
)


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


def test_only_the_newest_checkpoint_is_kept_by_default(tmp_path):
    """Defect 12 (issue 20): two 1.9 GB checkpoints per demo; one whole one is enough
    (the old one goes only after the new one is published)."""
    model, opt, sched = _trained()
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, model, opt, sched, {"version": step, "cursor": {}})
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step-3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3"]
    save_checkpoint(str(tmp_path), 4, model, opt, sched, {"version": 4, "cursor": {}}, keep=2)
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step-3", "step-4"]


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def test_the_checkpoint_shares_the_published_weights_file(tiny, tmp_path):  # noqa: F811
    """The checkpoint's model and RUN/weights/vN are one file (one inode, two names)."""
    from safetensors.torch import load_file

    from grpo_stream.config import SyncConfig
    from grpo_stream.sync.disk import DiskSync

    model = _hf_model(tiny)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sync = DiskSync(SyncConfig(), [], tmp_path / "weights", rank=0)
    folder = sync.publish(model, 3)
    assert sync.published(2) is None and sync.published(3) == folder
    ckpt = save_checkpoint(str(tmp_path), 3, model, opt, sched, {"version": 3, "cursor": {}},
                           model_files=sync.published(3))  # fmt: skip
    served, kept = folder / "model.safetensors", ckpt / "model" / "model.safetensors"
    assert os.stat(kept).st_ino == os.stat(served).st_ino
    assert os.stat(kept).st_nlink == 2
    assert missing_files(ckpt) == []
    shutil.rmtree(folder)  # the weights folder pruned: the checkpoint's name still holds it
    assert os.stat(kept).st_nlink == 1
    want = model.state_dict()
    for k, v in load_file(kept).items():
        torch.testing.assert_close(v, want[k], atol=0, rtol=0)
    again = _hf_model(ckpt / "model")  # from_pretrained loads the linked folder
    torch.testing.assert_close(again.state_dict()["lm_head.weight"], want["lm_head.weight"])


def test_a_refused_link_falls_back_to_a_copy(tmp_path, monkeypatch):
    """Another device (EXDEV) or a file system without hard links: the files are copied."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\x01" * 4096)
    (src / "config.json").write_text("{}")

    def refuse(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    assert link_files(src, dst) is False
    for name in ("model.safetensors", "config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
        assert os.stat(dst / name).st_ino != os.stat(src / name).st_ino
    monkeypatch.undo()
    assert link_files(src, tmp_path / "linked") is True
    assert os.stat(tmp_path / "linked" / "config.json").st_nlink == 2


def test_a_checkpoint_without_optimizer_restores_all_but_adams_moments(tmp_path, capsys):
    """learner.keep_final_optimizer = false: no AdamW state in trainer.pt (2x the fp32
    weights); a resume from it keeps the scheduler, RNG and state, and says so."""
    model, opt, sched = _trained()
    full = save_checkpoint(str(tmp_path / "a"), 1, model, opt, sched, {"version": 1, "cursor": {}})
    bare = save_checkpoint(str(tmp_path / "b"), 1, model, opt, sched, {"version": 1, "cursor": {}},
                           with_optimizer=False)  # fmt: skip
    blob = torch.load(bare / "trainer.pt", weights_only=False)
    assert blob["optimizer"] is None and blob["optimizer_format"] == "omitted"
    assert torch.load(full / "trainer.pt", weights_only=False)["optimizer"]["state"]
    opt2 = torch.optim.AdamW(_Tiny(3, 2).parameters(), lr=0.1)  # fresh: no moments
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    state = load_trainer_state(bare, opt2, sched2)
    assert state["step"] == 1
    assert opt2.state_dict()["state"] == {}  # moments start from zero
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)  # the scheduler's step 1
    assert "holds no optimizer state" in capsys.readouterr().err
