"""The learner's AdamW: torch's fused kernel on CPU (and CUDA), the same update as the
default loop, and the schedule's shape."""

from __future__ import annotations

import pytest
import torch

from grpo_stream.config import Config
from grpo_stream.learner.optim import build_optimizer


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_fused_on_cpu_with_the_default_loops_update():
    cfg = Config().learner
    cfg.lr, cfg.weight_decay = 1e-2, 0.1
    fused_model, loop_model = _model(), _model()
    opt, _ = build_optimizer(fused_model, cfg)
    assert opt.defaults["fused"] is True
    loop = torch.optim.AdamW(
        loop_model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    x = torch.randn(32, 8)  # [B, 8]
    for _ in range(3):
        for model, o in ((fused_model, opt), (loop_model, loop)):
            o.zero_grad()
            model(x).pow(2).mean().backward()  # [B, 1] -> scalar
            o.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_unfused_where_the_kernel_does_not_run():
    model = _model().to(torch.float64)  # fused AdamW takes float64 too; meta it does not
    meta = torch.nn.Linear(4, 4, device="meta")
    assert build_optimizer(model, Config().learner)[0].defaults["fused"] is True
    assert build_optimizer(meta, Config().learner)[0].defaults["fused"] is False


def test_the_schedule_warms_up_then_decays():
    cfg = Config().learner
    cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.max_steps, cfg.epochs = 1.0, 2, "linear", 3, 2
    opt, sched = build_optimizer(_model(), cfg)
    lrs = []
    for _ in range(6):  # 3 learner steps x 2 epochs = 6 optimizer steps
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
