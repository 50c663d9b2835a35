"""The individual preflight checks behind `grpo-stream doctor` (see grpo_stream/run/doctor.py).

Each `check_*(cfg)` returns `Check` lines (ok or not, and a reason naming the field or
file); none starts a server or writes anything but a probe file, removed at once:
security (a non-loopback server needs an API key), the model folder with its tokenizer,
chat template and tied embeddings, and the buffer path (writable, free disk for the
expected run, with the estimate shown).

    for c in check_buffer(cfg): print(c.line())
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from grpo_stream.config import DEFAULT_MODEL, Config, ConfigError
from grpo_stream.config.transports import transport_traits
from grpo_stream.core.errors import UserError

# Disk estimate per stored sample (bytes): int32 ids + UTF-8 text for prompt tokens,
# + float32 log-probs for completion tokens, plus the fixed fields of a row.
PROMPT_TOKENS_ASSUMED = 64  # generated tasks render ~40-60 tokens; files: see FILE_PROMPT
FILE_PROMPT_TOKENS_ASSUMED = 256
BYTES_PER_PROMPT_TOKEN = 8
BYTES_PER_COMPLETION_TOKEN = 12
BYTES_PER_ROW = 256
DISK_MARGIN = 2.0  # arrow roll-up rewrites segments: keep twice the estimate free


@dataclass(frozen=True)
class Check:
    name: str  # the field or thing checked ("buffer.path", "server.urls[0]", "model")
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL':<5} {self.name:<18} {self.detail}"


# ---------------------------------------------------------------- security
def is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: reachable from elsewhere
        return False


def check_security(cfg: Config) -> list[Check]:
    """A server reachable from other machines needs an API key (dev mode runs any RPC)."""
    s = cfg.server
    try:
        key = s.resolved_api_key()
    except ConfigError as e:
        return [Check("server.api_key_env", False, str(e))]
    if not s.urls:
        from grpo_stream.serving.server import check_host

        try:
            check_host(s)
        except ConfigError as e:
            return [Check("security", False, str(e))]
        where = f"servers bind {s.host}"
    else:
        remote = [(i, u) for i, u in enumerate(s.urls) if not is_loopback(urlparse(u).hostname)]
        if remote and not key and not s.allow_remote_dev_mode:
            i, u = remote[0]
            return [Check(f"server.urls[{i}]", False,
                          f"{u} is not loopback: set server.api_key (or server.api_key_env) "
                          "to the key the server was started with, or server."
                          "allow_remote_dev_mode = true on a trusted network")]  # fmt: skip
        where = f"{len(remote)} remote of {len(s.urls)} server.urls"
    how = "API key set" if key else "no API key"
    if not key and s.allow_remote_dev_mode:
        how += " (server.allow_remote_dev_mode = true: trusted network)"
    return [Check("security", True, f"{where}; {how}")]


# ---------------------------------------------------------------- model
def _model_folder(cfg: Config) -> tuple[Path | None, Check | None]:
    """The folder to inspect, or a final verdict (default model not prepared yet)."""
    from grpo_stream.serving.model import ModelPrepError, default_model_dir, find_gguf, is_ready

    if cfg.model.path == DEFAULT_MODEL:
        folder = default_model_dir()
        if is_ready(folder):
            return folder, None
        try:
            gguf = find_gguf()
        except ModelPrepError as e:
            return None, Check("model", False, f"model.path = {DEFAULT_MODEL!r}: {e}")
        return None, Check("model", True, f"{DEFAULT_MODEL}: not prepared yet; `run` "
                           f"converts {gguf.name} on first use (untied, chat template)")  # fmt: skip
    folder = Path(cfg.model.path).expanduser()
    if not folder.is_dir():
        return None, Check("model", False, f"model.path = {cfg.model.path!r}: no such folder")
    return folder, None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _has_chat_template(folder: Path) -> str | None:
    tok_cfg = _read_json(folder / "tokenizer_config.json") or {}
    if tok_cfg.get("chat_template"):
        return "tokenizer_config.json"
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            return name
    return None


def _tied(folder: Path, config: dict) -> bool:
    import grpo_stream.serving.model as m

    if hasattr(m, "is_tied"):  # transformers' own reading (architecture defaults included)
        return m.is_tied(folder)
    text = config.get("text_config") or config
    return bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))


def check_model(cfg: Config) -> list[Check]:
    """The folder, its tokenizer, its chat template (if used), tied embeddings under disk."""
    folder, verdict = _model_folder(cfg)
    if folder is None:
        return [verdict]
    config = _read_json(folder / "config.json")
    if config is None:
        return [Check("model", False, f"model.path: {folder}/config.json is missing or not JSON")]
    tokenizer = [n for n in ("tokenizer.json", "tokenizer.model", "vocab.json")
                 if (folder / n).is_file()]  # fmt: skip
    if not tokenizer:
        return [Check("model", False, f"model.path: {folder} has no tokenizer "
                      "(tokenizer.json, tokenizer.model or vocab.json)")]  # fmt: skip
    out = [Check("model", True, f"{folder}: config.json, {tokenizer[0]}")]
    if cfg.task.use_chat_template:
        where = _has_chat_template(folder)
        out.append(Check("chat template", where is not None,
                         f"in {where} (task.use_chat_template = true)" if where else
                         f"model.path: {folder} has no chat template; set "
                         "task.use_chat_template = false or use an instruct model"))  # fmt: skip
    out.append(_check_tied(cfg, folder, config))
    return out


def _check_tied(cfg: Config, folder: Path, config: dict) -> Check:
    try:
        tied = _tied(folder, config)
    except UserError as e:
        return Check("tied embeddings", False, str(e))
    if not tied:
        return Check("tied embeddings", True, "untied: lm_head is its own tensor")
    name = f"sync.transport = {cfg.sync.transport!r}"
    if not transport_traits(cfg.sync.transport).reloads_from_disk:
        return Check("tied embeddings", True, f"tied (fine with {name})")
    import grpo_stream.serving.model as m

    if hasattr(m, "untied_model_dir"):
        return Check("tied embeddings", True, f"tied: {name} serves an "
                     "untied copy, made into the cache on first use")  # fmt: skip
    return Check("tied embeddings", False, f"model.path: {folder} ties lm_head to the "
                 f"embedding; vLLM's disk reload would keep a stale head ({name}): use an "
                 "untied model or sync.transport = 'nccl'")  # fmt: skip


# ---------------------------------------------------------------- buffer path and disk
def expected_groups(cfg: Config) -> int:
    """Groups a run stores: every batch the learner trains plus the generator's lead,
    capped by the generator's and the task's own limits and by retention."""
    lr = cfg.learner
    n = (lr.max_steps + 1 + cfg.generator.max_ahead_batches) * lr.batch_groups
    for cap in (cfg.generator.stop_after_groups, cfg.task.num_prompts, cfg.buffer.max_groups):
        if cap is not None:
            n = min(n, cap)
    return n


def bytes_per_sample(cfg: Config) -> int:
    prompt = FILE_PROMPT_TOKENS_ASSUMED if cfg.task.name in ("jsonl", "parquet") else (
        PROMPT_TOKENS_ASSUMED)  # fmt: skip
    prompt = min(prompt, cfg.server.max_model_len - cfg.generator.max_tokens)
    return (prompt * BYTES_PER_PROMPT_TOKEN
            + cfg.generator.max_tokens * BYTES_PER_COMPLETION_TOKEN + BYTES_PER_ROW)  # fmt: skip


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _probe_dir(path: Path) -> tuple[Path | None, str | None]:
    """The folder writes would land in (the path, or its nearest existing ancestor), or
    the reason no write can happen there."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return None, f"{p} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".grpo-stream-doctor-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return None, f"cannot write in {p} ({type(e).__name__}: {e.strerror or e})"
    return p, None


def _buffer_target(cfg: Config) -> tuple[str, str]:
    """(field, path) of the buffer; without a run folder yet, `run.output_dir`."""
    if cfg.buffer.path:
        return "buffer.path", cfg.buffer.path
    if cfg.run.run_dir:
        return "buffer.path", cfg.buffer_path(cfg.run.run_dir)
    return "run.output_dir", cfg.run.output_dir


def check_buffer(cfg: Config) -> list[Check]:
    """The run folder and the buffer are writable, with free disk for the expected run."""
    out = []
    if cfg.run.run_dir and cfg.buffer.path:  # two places (else the buffer is in the run's)
        _, why = _probe_dir(Path(cfg.run.run_dir))
        out.append(Check("run.run_dir", why is None, f"{cfg.run.run_dir}: {why or 'writable'}"))
    field, path = _buffer_target(cfg)
    scheme = urlparse(path).scheme
    if scheme not in ("", "file"):
        return [*out, Check(field, True, f"{path}: remote store, not checked")]
    where, why = _probe_dir(Path(urlparse(path).path if scheme else path).expanduser())
    if why:
        return [*out, Check(field, False, f"{field} = {path}: {why}")]
    free = shutil.disk_usage(where).free
    groups, per, g = expected_groups(cfg), bytes_per_sample(cfg), cfg.generator.group_size
    need = groups * g * per
    estimate = f"~{_human(need)} ({groups} groups x {g} samples x ~{per} B)"
    if free < DISK_MARGIN * need:
        return [*out, Check(field, False, f"{field} = {path}: {_human(free)} free, less than "
                            f"{DISK_MARGIN:g}x the run's estimated {estimate}")]  # fmt: skip
    return [*out, Check(field, True, f"{path}: writable; {_human(free)} free for the run's "
                        f"estimated {estimate}")]  # fmt: skip
