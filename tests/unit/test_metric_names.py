"""Metric names are defined once, in `grpo_stream.core.metric_names`: no other product
module binds a module-level string constant to one of its names (a second definition
could drift from the first while both keep being used)."""

from __future__ import annotations

import ast
from pathlib import Path

from grpo_stream.core import metric_names as M

PACKAGE = Path(__file__).resolve().parents[2] / "grpo_stream"


def _string_constants(path: Path) -> list[tuple[str, int, str]]:
    """(name, line, value) of each module-level `NAME = "literal"` in `path`."""
    out = []
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        value = getattr(node, "value", None)
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            out += [(t.id, node.lineno, value.value) for t in targets if isinstance(t, ast.Name)]
    return out


def test_no_module_redefines_a_metric_name():
    names = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str)}
    assert M.EVAL_WAIT_S in names and len(names) > 40  # the scan sees the real table
    own = PACKAGE / "core" / "metric_names.py"
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name} = {value!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != own
        for name, line, value in _string_constants(path)
        if value in names
    ]
    assert found == [], "use grpo_stream.core.metric_names instead:\n" + "\n".join(found)


def test_the_learners_eval_wait_uses_the_shared_name(tmp_path):
    from grpo_stream.config.evaluation import EvalConfig
    from grpo_stream.core.eval_progress import wait_for_eval, write_eval_progress

    write_eval_progress(str(tmp_path), 4)
    waited = wait_for_eval(str(tmp_path), EvalConfig(every=2, wait_timeout_s=5), 4)
    assert list(waited) == [M.EVAL_WAIT_S] == ["eval_wait_s"]
