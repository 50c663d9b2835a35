"""`grpo-stream export RUN [--merge] [--out DIR]`: a run's newest checkpoint as a folder
other tools load.

    grpo-stream export runs/lora-demo            # RUN/export/step-N: the LoRA adapter
    grpo-stream export runs/lora-demo --merge    # RUN/export/step-N-merged: an HF model

RUN is a run folder (its newest whole checkpoint is exported) or one checkpoint folder
(`RUN/checkpoints/step-N`). A LoRA checkpoint's `model/` is the adapter alone (peft's
format: vLLM's `--lora-modules`, peft's `PeftModel.from_pretrained`); `--merge` loads the
run's base model (`model.path` of RUN/config.toml), merges the adapter into its weights
(peft's `merge_and_unload`) and writes a plain Hugging Face folder with the tokenizer,
which vLLM and transformers load like any model. A full-weights checkpoint's `model/` is
already such a folder and is exported as it is. The output is written atomically
(`DIR.tmp`, then renamed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpo_stream.core.atomic import fresh_dir, publish_dir
from grpo_stream.core.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")  # fmt: skip


class ExportError(UserError, ValueError):
    """The folder given holds no checkpoint to export."""


def find_checkpoint(spec: str) -> tuple[Path, Path]:
    """(the run folder, the checkpoint folder) for a run or checkpoint folder."""
    from grpo_stream.learner.checkpoint import latest_checkpoint

    path = Path(spec).expanduser().resolve()
    if (path / "state.json").is_file() and (path / "model").is_dir():
        return path.parent.parent, path
    if (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(str(path))
        if ckpt is not None:
            return path, ckpt
    raise ExportError(f"{spec}: no whole checkpoint (RUN/checkpoints/step-N) to export")


def merge_adapter(adapter: Path, base: Path, out: Path) -> Path:
    """Atomically write `base` with `adapter` merged into its weights as folder `out`."""
    import peft
    import torch

    from grpo_stream.learner.policy import load_causal_lm

    model = load_causal_lm(str(base), torch.device("cpu"), trainable=False)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = fresh_dir(out.with_name(out.name + ".tmp"))
    merged.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, tmp / name)
    return publish_dir(tmp, out)


def copy_folder(src: Path, out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    return publish_dir(tmp, out)


def export(spec: str, merge: bool, out: str | None) -> Path:
    """Export `spec`'s checkpoint (module docstring); returns the folder written."""
    from grpo_stream.config import load_run_config
    from grpo_stream.learner.lora import is_adapter_dir
    from grpo_stream.serving.model import resolve_model_path

    run_dir, ckpt = find_checkpoint(spec)
    adapter = is_adapter_dir(ckpt / "model")
    merging = merge and adapter
    name = ckpt.name + ("-merged" if merging else "")
    dest = Path(out).expanduser().resolve() if out else run_dir / "export" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not merging:
        if merge:
            print(f"[export] {ckpt} holds full weights: nothing to merge", file=sys.stderr)
        return copy_folder(ckpt / "model", dest)
    cfg = load_run_config(run_dir)
    base = resolve_model_path(cfg.model, cfg.sync.transport)
    return merge_adapter(ckpt / "model", Path(base), dest)


def export_cli(argv: list[str]) -> int:
    """`grpo-stream export ...` (see the module docstring); 2 on a user error."""
    p = argparse.ArgumentParser(prog="grpo-stream export", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run folder, or one checkpoint folder in it")
    p.add_argument("--merge", action="store_true",
                   help="merge a LoRA adapter into the base model (a plain HF folder)")  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default RUN/export/step-N)")
    args = p.parse_args(argv)
    try:
        folder = export(args.run, args.merge, args.out)
    except UserError as e:
        print(f"grpo-stream export: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0
