"""The `doctor`/preflight check of the reward model (`reward.functions` names `reward_model`).

    ok    reward_model.path     runs/rm: LlamaForSequenceClassification, one label
    ok    reward_model.urls[0]  http://10.0.0.5:8100: /classify answers one raw score

The folder is checked before anything starts (`grpo_stream.serving.rm_server.
check_classifier`: a causal LM or a multi-label classifier is refused with a clear
message). Running servers (`reward_model.urls`) are asked to score one short input
through the one client, within a short deadline; local servers are not started here.
"""

from __future__ import annotations

import asyncio

from grpo_stream.config import Config, ConfigError
from grpo_stream.run.doctor_checks import Check
from grpo_stream.serving.client import VLLMClient, VLLMError
from grpo_stream.serving.rm_server import check_classifier

DEADLINE_S = 5.0


def _uses_reward_model(cfg: Config) -> bool:
    return any(f.name == "reward_model" for f in cfg.reward.functions)


async def _probe(urls: list[str], served_name: str, key: str | None) -> list[tuple[bool, str]]:
    async with VLLMClient(DEADLINE_S, 4, retries=0, api_key=key) as client:

        async def one(url: str) -> tuple[bool, str]:
            try:
                await client.classify(url, served_name, [[1, 2, 3]], timeout_s=DEADLINE_S)
            except VLLMError as e:
                return False, str(e)
            return True, f"{url}: /classify answers one raw score"

        return list(await asyncio.gather(*(one(u) for u in urls)))


def check_reward_model(cfg: Config) -> list[Check]:
    if not _uses_reward_model(cfg):
        return []
    rm = cfg.reward_model
    try:
        hf = check_classifier(rm.path)
    except ConfigError as e:
        return [Check("reward_model.path", False, str(e))]
    archs = ", ".join(hf.get("architectures") or [])
    checks = [Check("reward_model.path", True, f"{rm.path}: {archs}, one label")]
    if rm.urls:
        results = asyncio.run(_probe(rm.resolved_urls(cfg.server.host), rm.served_name,
                                     cfg.server.resolved_api_key()))  # fmt: skip
        checks += [Check(f"reward_model.urls[{i}]", ok, d) for i, (ok, d) in enumerate(results)]
    return checks
