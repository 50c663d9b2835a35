"""User datasets: JSONL and Parquet files read offline, with errors naming file and column."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo_stream.config import TaskConfig
from grpo_stream.tasks import TaskError, make_prompt_source
from grpo_stream.tasks.dataset_files import _read_fallback

ROWS = [
    {"question": "What is 2+2?", "answer": 4, "level": "easy"},
    {"question": "What is 10*3?", "answer": 30, "level": "easy"},
    {"question": "What is 99-1?", "answer": 98, "level": "hard"},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(path: Path, name: str, **kw) -> TaskConfig:
    return TaskConfig(name=name, path=str(path), prompt_column="question", **kw)


def test_jsonl_one_pass(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", ROWS)
    prompts = list(make_prompt_source(cfg_for(path, "jsonl")))
    assert [p.text for p in prompts] == [r["question"] for r in ROWS]
    assert [p.answer for p in prompts] == ["4", "30", "98"]
    assert [p.prompt_id for p in prompts] == ["math-r0-e0", "math-r1-e0", "math-r2-e0"]
    assert prompts[2].meta == {
        "source": "math.jsonl",
        "row": 2,
        "epoch": 0,
        "fields": {"level": "hard"},
    }


def test_parquet_epochs_shuffle_and_instruction(tmp_path):
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    cfg = cfg_for(path, "parquet", passes=2, shuffle=True, seed=5, instruction="Be brief.")
    prompts = list(make_prompt_source(cfg))
    assert len(prompts) == 6
    assert len({p.prompt_id for p in prompts}) == 6
    for epoch in (0, 1):
        part = prompts[3 * epoch : 3 * epoch + 3]
        assert sorted(p.meta["row"] for p in part) == [0, 1, 2]
        assert all(p.meta["epoch"] == epoch for p in part)
    assert prompts[0].text == ROWS[prompts[0].meta["row"]]["question"] + " Be brief."
    assert list(make_prompt_source(cfg)) == prompts  # seeded order


def test_endless_epochs_capped_by_num_prompts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    prompts = list(make_prompt_source(cfg_for(path, "jsonl", passes=None, num_prompts=7)))
    assert [p.meta["row"] for p in prompts] == [0, 1, 2, 0, 1, 2, 0]
    assert prompts[-1].prompt_id == "d-r0-e2"


def test_missing_column_names_file_and_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(TaskError) as err:
        make_prompt_source(cfg_for(path, "jsonl", answer_column="solution"))
    msg = str(err.value)
    assert str(path) in msg and "'solution'" in msg and "task.answer_column" in msg
    with pytest.raises(TaskError, match="'prompt'.*task.prompt_column"):
        make_prompt_source(TaskConfig(name="jsonl", path=str(path)))


def test_missing_file_names_file(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(TaskError, match=f"file not found: {missing}"):
        make_prompt_source(cfg_for(missing, "parquet"))


def test_empty_prompt_names_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "", "answer": 1}])
    with pytest.raises(TaskError, match="row 0: column 'question'"):
        list(make_prompt_source(cfg_for(path, "jsonl")))


def test_fallback_reader_without_datasets(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert _read_fallback(path, "json") == ROWS
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert _read_fallback(tmp_path / "d.parquet", "parquet") == ROWS
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not valid JSON"):
        _read_fallback(tmp_path / "bad.jsonl", "json")
