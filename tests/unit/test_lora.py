"""LoRA in the learner on the tiny Llama: only the adapter trains, the reference is the
base model exactly (the adapter off, no second copy), the adapter's files load back to
the same policy, and a resumed LoRA learner ends where an uninterrupted one does."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from bench.synth import make_groups
from grpo_stream.buffer.store import open_writer
from grpo_stream.config import Config, LoraConfig, SyncConfig, load_config
from grpo_stream.core import metric_names as M
from grpo_stream.learner.batch import collate
from grpo_stream.learner.lora import adapter_disabled, apply_lora, policy_folders
from grpo_stream.learner.optim import build_optimizer
from grpo_stream.learner.policy import load_causal_lm, sequence_logprobs
from grpo_stream.learner.step import StepRunner, batch_advantages
from grpo_stream.sync.lora import write_adapter


def lora_setup(tiny_model_dir, beta: float = 0.0, **learner):
    """(cfg, model, runner, samples, advs): a real StepRunner on the tiny Llama with a
    rank-4 adapter; with beta > 0 the runner's reference is the policy itself."""
    cfg = Config(
        lora=LoraConfig(enabled=True, rank=4, alpha=8.0), sync=SyncConfig(transport="lora")
    )
    cfg.generator.temperature = 1.0
    cfg.loss.beta = beta
    for k, v in {"lr": 1e-2, "epochs": 2, "micro_batch_size": 8, **learner}.items():
        setattr(cfg.learner, k, v)
    torch.manual_seed(0)
    random.seed(0)
    model = apply_lora(load_causal_lm(str(tiny_model_dir), torch.device("cpu")), cfg.lora)
    opt, sched = build_optimizer(model, cfg.learner)
    ref = model if beta > 0 else None
    runner = StepRunner(cfg, model, ref, opt, sched, torch.device("cpu"), pad_id=0)
    groups = make_groups(2, group_size=4, prompt_len=6, completion_len=5)
    samples, advs, _ = batch_advantages(groups, cfg)
    return cfg, model, runner, samples, advs


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _logprobs(model, samples, advs) -> torch.Tensor:
    mb = collate(samples, advs, list(range(len(samples))), pad_id=0)
    with torch.no_grad():
        return sequence_logprobs(model, mb, 1.0, 1024)[0]  # [B, T]


@pytest.mark.parametrize(("fused", "shared"), [(True, True), (False, False)])
def test_only_the_adapter_changes_after_a_step(tiny_model_dir, fused, shared):
    _, model, runner, samples, advs = lora_setup(
        tiny_model_dir, fused_loss=fused, shared_prefix=shared
    )
    trained = [p for g in runner.opt.param_groups for p in g["params"]]
    names = {n for n, p in model.named_parameters() if any(p is q for q in trained)}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    before = _params(model)
    runner.run(samples, advs)
    after = _params(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == names  # every adapter tensor moved (epoch 2 moves lora_A too)
    assert sum(before[k].numel() for k in names) < 0.1 * sum(v.numel() for v in before.values())


def test_the_reference_is_the_base_model_exactly(tiny_model_dir):
    cfg, model, runner, samples, advs = lora_setup(tiny_model_dir, beta=0.1, epochs=1)
    first = runner.run(samples, advs)
    # lora_B starts at zero: the policy was the base model, so KL to the reference was 0
    # (up to the fused loss's rounding against the reference's plain log-probs)
    assert abs(first[M.KL_REF]) < 1e-9
    second = runner.run(samples, advs)
    assert second[M.KL_REF] > 1e-6  # the reference stayed the base while the adapter moved
    base = load_causal_lm(str(tiny_model_dir), torch.device("cpu"), trainable=False)
    want = _logprobs(base, samples, advs)  # [B, T]
    policy = _logprobs(model, samples, advs)  # [B, T]
    with adapter_disabled(model):
        off = _logprobs(model, samples, advs)  # [B, T]
    assert torch.equal(off, want)
    assert not torch.equal(policy, want)
    assert torch.equal(_logprobs(model, samples, advs), policy)  # switched back on
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_the_written_adapter_loads_back_to_the_same_policy(tiny_model_dir, tmp_path):
    cfg, model, runner, samples, advs = lora_setup(tiny_model_dir)
    runner.run(samples, advs)
    folder = write_adapter(model, tmp_path / "adapters" / "v1")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    keys = load_file(folder / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    fresh = load_causal_lm(str(tiny_model_dir), torch.device("cpu"))
    loaded = apply_lora(fresh, cfg.lora, folder)
    assert torch.equal(_logprobs(loaded, samples, advs), _logprobs(model, samples, advs))
    assert all(p.requires_grad == ("lora_" in n) for n, p in loaded.named_parameters())


def _prefill(run_dir) -> None:
    w = open_writer(str(run_dir / "buffer"), "arrow", run_id="resume")
    w.append_groups(make_groups(10, group_size=4, prompt_len=6, completion_len=5))
    w.close()


def _learn_config(run_dir, tiny, steps: int, *more: str):
    return load_config(None, [
        f"run.run_dir={run_dir}", f"model.path={tiny}", "sync.transport=none",
        "learner.batch_groups=2", f"learner.max_steps={steps}", "learner.checkpoint_every=1",
        "learner.micro_batch_size=4", "learner.lr=1e-2", "learner.epochs=2",
        "generator.temperature=1.0", "learner.max_staleness=1000", "loss.beta=0.05",
        "lora.enabled=true", "lora.rank=4", *more,
    ])  # fmt: skip


def _learn(run_dir, tiny, steps: int, resume: bool = False, *more: str):
    """The learner, after `steps` steps (sync.transport = none: sync.background on)."""
    from grpo_stream.learner.loop import Learner

    cfg = _learn_config(run_dir, tiny, steps, *more)
    (run_dir / "config.toml").write_text(cfg.to_toml())  # what replay reads
    learner = Learner(cfg, str(run_dir), str(tiny), resume=resume)
    learner.run()
    return learner


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_replay_of_a_lora_run_logs_the_learners_rows(tmp_path, tiny_model_dir):
    """`grpo-stream replay` of a LoRA run, from the initial model and from an adapter
    checkpoint (its AdamW state): the learner's rows, key for key, bar wall-clock keys."""
    from grpo_stream.learner.replay import replay_cli

    run = tmp_path / "run"
    run.mkdir()
    _prefill(run)
    _learn(run, tiny_model_dir, 3, False, "learner.keep_checkpoints=2")
    learned = _rows(run / "metrics.jsonl")
    assert [r[M.STEP] for r in learned] == [1, 2, 3]
    assert replay_cli([str(run), "--out", str(tmp_path / "init")]) == 0
    assert replay_cli([str(run), "--checkpoint", "step-2", "--out", str(tmp_path / "c2")]) == 0
    from_init, from_ckpt = _rows(tmp_path / "init" / "metrics.jsonl"), _rows(
        tmp_path / "c2" / "metrics.jsonl")  # fmt: skip
    assert [r[M.STEP] for r in from_ckpt] == [3]
    for a, b in [*zip(learned, from_init, strict=True), (learned[2], from_ckpt[0])]:
        assert set(a) - set(M.LEARNER_ONLY) == set(b)
        for k in set(b) - set(M.WALL_CLOCK):
            assert a[k] == b[k], (a[M.STEP], k, a[k], b[k])
    assert learned[2][M.KL_REF] > 0  # the adapter-off reference, replayed too


def test_a_resumed_lora_learner_equals_an_uninterrupted_one(tmp_path, tiny_model_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        _prefill(d)
    _learn(a, tiny_model_dir, 4)
    _learn(b, tiny_model_dir, 2)
    assert not (b / "checkpoints" / "step-4").exists()
    start = load_file(b / "checkpoints" / "step-2" / "model" / "adapter_model.safetensors")
    _learn(b, tiny_model_dir, 4, resume=True)
    wa = load_file(a / "checkpoints" / "step-4" / "model" / "adapter_model.safetensors")
    wb = load_file(b / "checkpoints" / "step-4" / "model" / "adapter_model.safetensors")
    assert set(wa) == set(wb) and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    assert any(not torch.equal(start[k], wa[k]) for k in wa)  # steps 3-4 moved it


def test_a_background_checkpoint_copies_the_adapter_alone(tmp_path, tiny_model_dir):
    """sync.background keeps a copy of what each checkpoint writes: with LoRA the
    adapter's tensors, not the frozen base (a second whole model, held for the run)."""
    _prefill(tmp_path)
    learner = _learn(tmp_path, tiny_model_dir, 2)
    assert learner.background
    kept = [v for k, v in learner._kept.items() if k.startswith("model/")]
    adapter = [p for n, p in learner.s.model.named_parameters() if "lora_" in n]
    assert len(kept) == len(adapter) > 0
    assert sum(v.nbytes for v in kept) == sum(p.nbytes for p in adapter)


def test_a_checkpoint_writes_the_adapter_it_is_given(tiny_model_dir, tmp_path):
    """A background checkpoint writes the adapter copied after its step, not the live
    one the next step has moved since."""
    from grpo_stream.learner.background import snapshot
    from grpo_stream.learner.checkpoint import save_checkpoint
    from grpo_stream.learner.lora import saved_state_dict

    _, model, runner, samples, advs = lora_setup(tiny_model_dir)
    runner.run(samples, advs)
    copy = snapshot(saved_state_dict(model), {})
    runner.run(samples, advs)  # the next step trains meanwhile
    ckpt = save_checkpoint(str(tmp_path), 1, model, runner.opt, runner.sched,
                           {"version": 1}, state_dict=copy)  # fmt: skip
    saved = load_file(ckpt / "model" / "adapter_model.safetensors")
    want = {k.replace(".default.", "."): v for k, v in copy.items()}
    assert len(saved) == len(want) > 0
    for k, v in want.items():
        assert torch.equal(saved["base_model.model." + k], v)
    live = saved_state_dict(model)
    assert any(not torch.equal(live[k], copy[k]) for k in copy)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.rank=8"], r"lora.rank applies only with lora.enabled = True"),
        (["sync.transport=lora"], r"sync.transport = 'lora' pushes a LoRA adapter"),
        (["lora.enabled=true"], r"sync.transport = 'disk'.*pushes full weights"),
        (
            ["lora.enabled=true", "sync.transport=lora", 'lora.target_modules=["lm_head"]'],
            r"lora.target_modules.*fused output layer",
        ),  # fmt: skip
        (
            ["lora.enabled=true", "sync.transport=lora", "server.max_loras=2"],
            r"server.max_loras = 2: .* learner.max_staleness \+ 2 = 4",
        ),  # fmt: skip
    ],
)
def test_config_refusals_name_the_field(overrides, message):
    from grpo_stream.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert load_config(None, ["lora.enabled=true", "sync.transport=none"]).lora.enabled


def test_checkpoint_kind_must_match_the_config(tiny_model_dir, tmp_path):
    on, off = LoraConfig(enabled=True), LoraConfig()
    (tmp_path / "adapter_config.json").write_text("{}")
    tiny = str(tiny_model_dir)
    assert policy_folders(on, str(tmp_path), tiny) == (tiny, str(tmp_path))
    assert policy_folders(on, tiny, tiny) == (tiny, None)
    with pytest.raises(ValueError, match="holds a LoRA adapter: set lora.enabled = true"):
        policy_folders(off, str(tmp_path), tiny)
    with pytest.raises(ValueError, match="holds full weights"):
        policy_folders(on, str(tmp_path / "nope"), tiny)


def test_the_targets_must_exist_in_the_model(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"lora.target_modules = \['wq'\]"):
        apply_lora(model, LoraConfig(enabled=True, target_modules=["wq"]))


def test_export_writes_the_adapter_or_a_merged_model(tmp_path, tiny_model_dir):
    """`grpo-stream export RUN [--merge]`: the merged folder loads with transformers alone
    and gives the adapter policy's log-probs."""
    from grpo_stream.cli import main
    from grpo_stream.config import write_run_config
    from grpo_stream.learner.checkpoint import save_checkpoint

    cfg, model, runner, samples, advs = lora_setup(tiny_model_dir)
    runner.run(samples, advs)
    run = tmp_path / "run"
    write_run_config(load_config(None, [f"model.path={tiny_model_dir}", "sync.transport=lora",
                                        "lora.enabled=true"]), run, "learn")  # fmt: skip
    save_checkpoint(str(run), 1, model, runner.opt, runner.sched, {"version": 1})
    assert main(["export", str(run)]) == 0
    adapter = run / "export" / "step-1"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert main(["export", str(run / "checkpoints" / "step-1"), "--merge"]) == 0
    merged = run / "export" / "step-1-merged"
    assert not (merged / "adapter_config.json").exists()
    plain = load_causal_lm(str(merged), torch.device("cpu"), trainable=False)
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(
        _logprobs(plain, samples, advs), _logprobs(model, samples, advs), atol=1e-5, rtol=0
    )
    assert main(["export", str(tmp_path / "nothing")]) == 2


def test_eval_of_a_lora_checkpoint_says_to_merge_it_first(tmp_path):
    from grpo_stream.config import ConfigError
    from grpo_stream.eval.cli import resolve_target

    (tmp_path / "checkpoints" / "step-3" / "model").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-3" / "model" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"step-3 holds a LoRA adapter.*export .* --merge"):
        resolve_target(str(tmp_path), Config())


def test_rank_alpha_dropout_and_targets_reach_the_adapter(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), torch.device("cpu"))
    cfg = LoraConfig(enabled=True, rank=3, alpha=12.0, dropout=0.25, target_modules=["v_proj"])
    model = apply_lora(model, cfg)
    a = {n: p.shape for n, p in model.named_parameters() if "lora_A" in n}
    assert a and all(".v_proj." in n and s[0] == 3 for n, s in a.items())
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.scaling["default"] == 12.0 / 3 and layer.lora_dropout["default"].p == 0.25
