"""User datasets from local JSONL or Parquet files (tasks `jsonl` and `parquet`).

The file is read with the `datasets` library, offline (HF_DATASETS_OFFLINE=1 is set
unless already set) and without leaving a cache behind, or with pyarrow/json when
`datasets` is not installed. Each row gives one prompt: `cfg.prompt_column` is the
question (followed by the task's instruction, or put into it where it says "{question}") and
`cfg.answer_column` the reference answer (as a string; GSM8K's "... #### 72" and MATH's
"... \\boxed{72}" solutions are read by the `math_verify` reward); the other columns go
to `meta["fields"]`. Ids are `{file stem}-r{row}-e{epoch}`.
A missing file or column raises `TaskError` naming the file and the column.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grpo_stream.config import TaskConfig
from grpo_stream.core import jsonl
from grpo_stream.tasks.prompt import Prompt, TaskError, apply_instruction


def _read_with_datasets(path: Path, fmt: str) -> list[dict[str, Any]]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()  # a failure must read as one line, not a progress bar
    datasets.logging.set_verbosity_error()
    # a throwaway cache: the rows are materialised below, nothing is worth keeping
    with tempfile.TemporaryDirectory(prefix="grpo-stream-datasets-") as cache:
        ds = datasets.load_dataset(
            fmt, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
        )
        return ds.to_list()


def _read_fallback(path: Path, fmt: str) -> list[dict[str, Any]]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    try:  # a finished file: its last line may lack a newline, and every line must parse
        return jsonl.read(path, complete=True)
    except jsonl.JSONLError as e:
        raise TaskError(str(e)) from None


def read_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    """All rows of a local `fmt` ("json" or "parquet") file, as dicts."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return _read_fallback(path, fmt)
    try:
        return _read_with_datasets(path, fmt)
    except Exception as e:  # datasets wraps parse errors in many types; name the file
        if fmt == "json":  # the plain reader names the bad line ("path:2: not valid JSON")
            _read_fallback(path, fmt)
        raise TaskError(f"{path}: could not read as {fmt}: {type(e).__name__}: {e}") from e


def _check_columns(rows: list[dict[str, Any]], path: Path, cfg: TaskConfig) -> None:
    if not rows:
        raise TaskError(f"{path}: the dataset has no rows")
    columns = list(rows[0])
    for field, column in (
        ("task.prompt_column", cfg.prompt_column),
        ("task.answer_column", cfg.answer_column),
    ):
        if column not in columns:
            raise TaskError(f"{path}: no column {column!r} ({field}); columns are {columns}")


def _row_prompt(row: dict[str, Any], index: int, epoch: int, path: Path, cfg: TaskConfig) -> Prompt:
    text = row[cfg.prompt_column]
    if not isinstance(text, str) or not text.strip():
        raise TaskError(
            f"{path}: row {index}: column {cfg.prompt_column!r} is not a non-empty string"
        )
    answer = row[cfg.answer_column]
    others = {k: v for k, v in row.items() if k not in (cfg.prompt_column, cfg.answer_column)}
    instruction = cfg.resolved_instruction()
    return Prompt(
        prompt_id=f"{path.stem}-r{index}-e{epoch}",
        text=apply_instruction(text, instruction) if instruction else text,
        answer="" if answer is None else str(answer),
        meta={"source": path.name, "row": index, "epoch": epoch, "fields": others},
    )


def _epochs(rows: list[dict[str, Any]], path: Path, cfg: TaskConfig) -> Iterator[Prompt]:
    epoch = 0
    while not cfg.passes or epoch < cfg.passes:  # 0 (or None): endless
        order = list(range(len(rows)))
        if cfg.shuffle:
            random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        for index in order:
            yield _row_prompt(rows[index], index, epoch, path, cfg)
        epoch += 1


def dataset_prompts(cfg: TaskConfig, fmt: str) -> Iterator[Prompt]:
    """Read and check the file now; the returned iterator does no I/O."""
    if not cfg.path:
        raise TaskError(f"task.path is required for task.name = {cfg.name!r}")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise TaskError(f"task.path: file not found: {path}")
    rows = read_rows(path, fmt)
    _check_columns(rows, path, cfg)
    return _epochs(rows, path, cfg)
