"""The learner's GPU smoke test's parts (`bench.gpu_smoke`): a random Llama of a given
size, the learner config it trains under, synthetic groups and the project's StepRunner.

    model = build_model(SIZES["small"], device)
    samples, advs = synthetic_batch(size, learner_config(size))
    runner = make_runner(learner_config(size), model, device)

torch here; transformers and the project inside the functions (`bench.gpu_smoke` checks
first that their wheels were carried).
"""

from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama_config(size: dict):
    from transformers import LlamaConfig

    h, heads = size["hidden"], size["heads"]
    return LlamaConfig(vocab_size=size["vocab"], hidden_size=h, intermediate_size=h * 3,
                       num_hidden_layers=size["layers"], num_attention_heads=heads,
                       num_key_value_heads=heads, head_dim=h // heads,
                       max_position_embeddings=1024, tie_word_embeddings=False,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip


def build_model(size: dict, device: torch.device, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size)).to(device)  # float32 master weights
    model.train()
    return model


def learner_config(size: dict):
    from grpo_stream.config import config_from_dict

    learner = {"dtype": "bfloat16", "fused_loss": True, "epochs": 2, "lr": 1e-4,
               "micro_batch_size": size["micro"], "logprob_chunk_size": size["chunk"]}  # fmt: skip
    generator = {"temperature": 1.0, "group_size": size["group_size"]}
    return config_from_dict({"learner": learner, "generator": generator}, "bench.gpu_smoke")


def synthetic_batch(size: dict, cfg, seed: int = 0):
    """(samples, advantages): `groups` groups of `group_size`, random ids and rewards."""
    from grpo_stream.buffer.schema import Sample
    from grpo_stream.learner.step import batch_advantages

    g = torch.Generator().manual_seed(seed)
    groups = []
    for gi in range(size["groups"]):
        prompt = torch.randint(3, size["vocab"], (size["prompt"],), generator=g).tolist()
        group = []
        for k in range(size["group_size"]):
            comp = torch.randint(3, size["vocab"], (size["completion"],), generator=g).tolist()
            lp = (-torch.rand(size["completion"], generator=g) * 8).tolist()
            reward = float(torch.rand((), generator=g) > 0.5)
            group.append(Sample("smoke", f"p{gi}", k, 0, prompt, comp, lp, reward, group_id=gi))
        groups.append(group)
    return batch_advantages(groups, cfg)[:2]


def make_runner(cfg, model, device: torch.device, world: int = 1, rank: int = 0):
    from grpo_stream.learner.optim import build_optimizer
    from grpo_stream.learner.step import StepRunner

    opt, sched = build_optimizer(model, cfg.learner)
    return StepRunner(cfg, model, None, opt, sched, device, pad_id=0, world=world, rank=rank)
