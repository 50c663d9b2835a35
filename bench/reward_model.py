"""Reward-model scoring: the generator's scorer against a saturating client, and its cost.

One vLLM CPU policy server (SmolLM2-135M from the cache) and one pooling server for the
reward model (`--rm PATH`, else a one-label classifier made here from the policy's
weights with a seeded random head: scoring costs the same whatever the head learned).

- Scoring (same server, same inputs, same groups in flight): `--prompts` groups of
  `--group-size` completions are sampled once from the policy server. Arm "scorer" is
  `RewardModelScorer` (the generator's: it renders each prompt + completion with the
  reward model's chat template, one /classify request per group, bounded by
  `reward_model.max_concurrency`); arm "saturating" posts the same pre-rendered token
  ids with one aiohttp session and a semaphore. Figure: throughput_vs_saturating_client
  (scorer samples/s ÷ saturating samples/s, goal >= 0.9).
- Cost: `Generator.run()` end to end on the same prompts with the rule reward
  (`numeric_answer`) and with the reward model (`reward_model`), samples/s side by side
  (the cost, reported in the results' config: `rm_generator_samples_ratio`).

Runs alternate A B B A ... (`--rounds` pairs) to cancel drift.

    GRPO_STREAM_CACHE=... python -m bench.reward_model   # table + bench/results/reward_model.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.figures import figure, write_result
from bench.generator import tok_per_s
from grpo_stream.config import Config, ModelConfig, ServerConfig, load_config
from grpo_stream.generator.loop import Generator
from grpo_stream.generator.reward_model import RewardModelScorer
from grpo_stream.serving.client import VLLMClient
from grpo_stream.tasks import make_prompt_source, render_prompt

RESULTS = Path(__file__).parent / "results" / "reward_model.json"
GOAL = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rm", default=None, help="a reward model folder (default: made here)")
    p.add_argument("--prompts", type=int, default=16, help="groups per run")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4, help="groups in flight")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs per comparison")
    p.add_argument("--port", type=int, default=8412, help="policy server; the RM uses +1")
    return p.parse_args(argv)


def make_rm(policy_dir: Path, out: Path) -> Path:
    """A one-label classifier with the policy's body and a seeded random `score` head."""
    import torch

    from grpo_stream.rm.train import load_reward_model

    torch.manual_seed(0)
    model, tok = load_reward_model(policy_dir)  # the one loader `rm train` uses
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_cfg(
    args, urls: tuple[str, str], dirs: tuple[Path, Path], run_dir: str, rm: bool
) -> Config:
    reward = '[{name = "reward_model"}]' if rm else '[{name = "numeric_answer"}]'
    return load_config(
        None,
        [
            f"run.run_dir={json.dumps(run_dir)}",
            f"model.path={json.dumps(str(dirs[0]))}",
            f"server.urls={json.dumps([urls[0]])}",
            f"reward.functions={reward}",
            f"reward_model.path={json.dumps(str(dirs[1]))}",
            f"reward_model.urls={json.dumps([urls[1]])}",
            f"reward_model.max_concurrency={args.concurrency}",
            f"generator.group_size={args.group_size}",
            f"generator.max_tokens={args.max_tokens}",
            f"generator.stop_after_groups={args.prompts}",
            f"generator.max_in_flight={args.concurrency}",
            "learner.batch_groups=100000",  # no learner here: keep the gate open
            "generator.wait_for_learner=false",
        ],
    )


async def sample_groups(cfg: Config, tokenizer, count: int) -> list[tuple]:
    """(prompt, [completion text] * G) for the first `count` prompts, sampled once."""
    prompts = [p for p, _ in zip(make_prompt_source(cfg.task), range(count), strict=False)]
    sampling = {"temperature": 1.0, "max_tokens": cfg.generator.max_tokens}
    async with VLLMClient(timeout_s=300) as client:

        async def one(prompt):
            _, ids = render_prompt(prompt, tokenizer, cfg.task)
            outs = await client.complete(
                cfg.server.urls[0], cfg.model.served_name, ids, n=cfg.generator.group_size,
                sampling=sampling,
            )  # fmt: skip
            return prompt, [o.text for o in outs]

        return list(await asyncio.gather(*(one(p) for p in prompts)))


async def scorer_arm(
    cfg: Config, scorer: RewardModelScorer, groups: list[tuple]
) -> tuple[int, float]:
    """(samples, seconds) of the generator's scorer over every group, rendering included."""
    # a fresh scorer per event loop (its semaphore belongs to one), the tokenizer shared
    scorer = RewardModelScorer(cfg.reward_model, scorer.urls, cfg.task, scorer.tokenizer)
    async with VLLMClient(timeout_s=300) as client:
        scorer.bind(client)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(scorer(p, cs) for p, cs in groups))
        seconds = time.perf_counter() - t0
    bad = [o for group in outs for o in group if isinstance(o, str)]
    if bad:
        raise RuntimeError(f"reward model failed {len(bad)} samples: {bad[0]}")
    return sum(len(o) for o in outs), seconds


async def saturating_arm(url: str, name: str, batches: list[list[list[int]]], conc: int):
    """(samples, seconds) of the same /classify requests from a bare aiohttp client."""
    sem = asyncio.Semaphore(conc)
    conn = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(300)) as s:

        async def one(batch: list[list[int]]) -> int:
            body = {"model": name, "input": batch, "use_activation": False,
                    "add_special_tokens": False}  # fmt: skip
            async with sem, s.post(f"{url}/classify", json=body) as resp:
                resp.raise_for_status()
                return len((await resp.json())["data"])

        t0 = time.perf_counter()
        n = await asyncio.gather(*(one(b) for b in batches))
        return sum(n), time.perf_counter() - t0


def alternate(arms: dict, rounds: int) -> dict[str, list[tuple[int, float]]]:
    """Each arm `rounds` times, in the order A B, B A, ...; prints each run."""
    names = list(arms)
    runs: dict[str, list[tuple[int, float]]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(arms[name]())
            n, sec = runs[name][-1]
            print(f"  {name:<12} {n:6d} samples {sec:6.2f} s {n / sec:8.1f} samples/s")
    return runs


def generator_arm(args, urls, dirs, workdir: str, rm: bool):
    def run() -> tuple[int, float]:
        run_dir = tempfile.mkdtemp(dir=workdir)
        cfg = make_cfg(args, urls, dirs, run_dir, rm)
        gen = Generator(cfg, run_dir, str(dirs[0]))
        t0 = time.perf_counter()
        written = asyncio.run(gen.run())
        seconds = time.perf_counter() - t0
        if written != args.prompts or gen.failed_prompts:
            raise RuntimeError(f"generator wrote {written}/{args.prompts} groups")
        return written * args.group_size, seconds

    return run


def measure(args, urls: tuple[str, str], dirs: tuple[Path, Path]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as workdir:
        cfg = make_cfg(args, urls, dirs, workdir, rm=True)
        scorer = RewardModelScorer(cfg.reward_model, [urls[1]], cfg.task)
        groups = asyncio.run(sample_groups(cfg, scorer.tokenizer, args.prompts))
        batches = [[scorer.input_ids(p, c) for c in cs] for p, cs in groups]
        name, conc = cfg.reward_model.served_name, args.concurrency
        asyncio.run(saturating_arm(urls[1], name, batches[:conc], conc))  # warm-up
        scoring = alternate(
            {
                "scorer": lambda: asyncio.run(scorer_arm(cfg, scorer, groups)),
                "saturating": lambda: asyncio.run(saturating_arm(urls[1], name, batches, conc)),
            },
            args.rounds,
        )
        generating = alternate(
            {
                "rules": generator_arm(args, urls, dirs, workdir, rm=False),
                "reward_model": generator_arm(args, urls, dirs, workdir, rm=True),
            },
            args.rounds,
        )
    return {"scoring": scoring, "generator": generating}


def start_servers(args, dirs: tuple[Path, Path], log_dir: Path) -> list:
    from grpo_stream.serving.rm_server import RewardModelServer
    from grpo_stream.serving.server import VLLMServer

    scfg = ServerConfig(max_model_len=512)
    servers = [
        VLLMServer(dirs[0], "policy", args.port, scfg, log_dir / "bench-rm-policy.log"),
        RewardModelServer(dirs[1], "reward", args.port + 1, scfg, log_dir / "bench-rm-rm.log"),
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            print(f"{s.url} up after {s.wait_healthy():.0f} s")
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def report(args, runs: dict, rm_dir: Path, made: bool) -> dict:
    rates = {f"{part}.{arm}": tok_per_s(r) for part in runs for arm, r in runs[part].items()}
    ratio = rates["scoring.scorer"] / rates["scoring.saturating"]
    cost = rates["generator.reward_model"] / rates["generator.rules"]
    print(f"{'arm':<24}{'samples/s':>10}")
    for k, v in rates.items():
        print(f"{k:<24}{v:10.1f}")
    print(f"throughput_vs_saturating_client = {ratio:.3f} (goal >= {GOAL})")
    print(f"rm_generator_samples_ratio = {cost:.3f} (reward model / rules, reported)")
    config = {
        **vars(args),
        "rm": str(rm_dir) if not made else "made here (policy body, random head)",
        "samples_per_s": {k: round(v, 2) for k, v in rates.items()},
        "rm_generator_samples_ratio": round(cost, 4),  # the cost: reported, no goal
        "runs": {
            p: {a: [[n, round(s, 3)] for n, s in r] for a, r in v.items()} for p, v in runs.items()
        },  # fmt: skip
    }
    fig = figure("throughput_vs_saturating_client", ratio, "ratio", ">=", GOAL)
    return write_result(RESULTS, [fig], config)


def main(argv: list[str] | None = None) -> dict:
    from grpo_stream.serving.model import resolve_model_path

    args = parse_args(argv)
    policy = resolve_model_path(ModelConfig())
    with tempfile.TemporaryDirectory(prefix="bench-rm-model-") as tmp:
        rm_dir = Path(args.rm) if args.rm else make_rm(policy, Path(tmp) / "rm")
        servers = start_servers(args, (policy, rm_dir), Path(tempfile.gettempdir()))
        try:
            urls = (servers[0].url, servers[1].url)
            runs = measure(args, urls, (policy, rm_dir))
        finally:
            for s in servers:
                s.stop()
        return report(args, runs, rm_dir, made=args.rm is None)


if __name__ == "__main__":
    main()
