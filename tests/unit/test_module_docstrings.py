"""Module docstrings say what a module is for and how to use it (DESIGN.md): they name
code that exists, and carry no change history and no benchmark figures (those live in
bench/RESULTS.md, with the bench that measures them)."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "grpo_stream"
# a speed or time claim: "~5x faster", "takes 0.15 s", "0.15 s fused against 0.58 s"
FIGURE = re.compile(
    r"\d(?:\.\d+)?\s?[x×] (?:faster|slower|shorter|longer|smaller|larger)\b"
    r"|\btakes? (?:about )?\d+(?:\.\d+)? ?(?:s|ms|min)\b"
    r"|\b\d+(?:\.\d+)? ?(?:s|ms) (?:fused|against|vs)\b"
)
# change history: what the code was, when, or since which session
HISTORY = re.compile(
    r"\((?:was|previously|formerly)\b|\bsession \d|\bno longer\b|\bused to\b"
    r"|\bmade before\b|\bfor older imports\b"
)
EXTERNAL = {
    "to_pylist",
    "softmax",
}  # pyarrow's (buffer/columns.py); vLLM's old field (generator/reward_model.py)


def _docstrings(*parts: str) -> list[tuple[Path, str]]:
    paths = sorted(p for part in parts for p in (PACKAGE / part).rglob("*.py"))
    return [(p, ast.get_docstring(ast.parse(p.read_text())) or "") for p in paths]


def test_no_history_or_figures_in_module_docstrings():
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p, doc in _docstrings(".")
           for rx in (FIGURE, HISTORY) for m in rx.finditer(" ".join(doc.split()))]  # fmt: skip
    assert bad == []


def _defined_names() -> set[str]:
    """Every name the package defines or binds, and every string constant it holds."""
    names = set(dir(builtins))
    for p in PACKAGE.rglob("*.py"):
        names.add(p.stem)
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[-1])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


def test_role_docstrings_name_code_that_exists():
    """generator/, eval/, buffer/: each `name` or `name()` in a module docstring is code
    (or a metric, field or file) of the project; a renamed function leaves none behind."""
    names = _defined_names() | EXTERNAL
    missing = []
    for p, doc in _docstrings("generator", "eval", "buffer"):
        for tok in re.findall(r"`([A-Za-z_][\w.]*)(?:\(\))?`", doc):
            parts = tok.split(".")
            if parts[-1] in {"py", "json", "jsonl", "toml"} or parts[0] == "os":
                continue
            if parts[-1] not in names:
                missing.append(f"{p.relative_to(ROOT)}: `{tok}`")
    assert missing == []
