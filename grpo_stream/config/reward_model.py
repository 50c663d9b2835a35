"""The `[reward_model]` section: a sequence-classification reward model served by vLLM.

`reward.functions` may name `reward_model`; the generator then scores every completion
of a group through this section's server(s) (`grpo_stream.generator.reward_model`).
The servers are either running ones (`urls`) or `num_servers` launched from `port`
upward with vLLM's pooling runner (`grpo_stream.serving.rm_server`). They follow the
policy servers' host and API-key rules (`server.host`, `server.api_key`,
`server.api_key_env`): one key guards every vLLM server of a run.

    [reward_model]
    path = "runs/rm"           # an AutoModelForSequenceClassification folder, one label
    port = 8100
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RewardModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: str | None = Field(
        None,
        description="the reward model: a Hugging Face folder (path) of a one-label "
        "*ForSequenceClassification model (`grpo-stream rm train` writes one); its "
        "tokenizer and chat template render what is scored",
    )
    served_name: str = Field("reward", description="model name the reward server serves")
    urls: list[str] = Field(
        default_factory=list,
        description="running reward-model servers (http URLs); empty: launch "
        "`num_servers` local ones on ports from `port` upward",
    )
    num_servers: int = Field(1, ge=1, description="local reward servers to launch (`urls` empty)")
    port: int = Field(8100, ge=1, le=65535, description="TCP port of the first local server")
    dtype: str = Field("float32", description="vLLM --dtype of the reward model's weights")
    max_len: int = Field(
        1024, ge=16, description="vLLM --max-model-len: longest prompt + completion (tokens)"
    )
    timeout_s: float = Field(
        60.0, gt=0, description="deadline of one group's scoring, retries included (seconds)"
    )
    max_concurrency: int = Field(
        8, ge=1, description="groups scored at once against the reward servers (requests)"
    )
    retries: int = Field(
        2, ge=0, description="retries of a transient error (refused, cut, 5xx, 429) per group"
    )

    def resolved_urls(self, host: str) -> list[str]:
        """`urls`, else the local servers on `host` (the policy servers' `server.host`)."""
        if self.urls:
            return [u.rstrip("/") for u in self.urls]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return [f"http://{shown}:{self.port + i}" for i in range(self.num_servers)]
