"""`grpo-stream compare RUN_DIR... [--out DIR]`: runs side by side, as curves and a table.

    grpo-stream compare runs/sweeps/epochs                  # a sweep folder: all its points
    grpo-stream compare runs/a runs/b --threshold 0.6 --out /tmp/cmp
    grpo-stream compare runs/sweeps/epochs --write-doc docs/experiments.md --title "..."

Writes OUT/compare.md, OUT/summary.json, OUT/curves.png, OUT/diagnostics.png (default
OUT: a `compare` folder beside the runs). `--write-doc FILE` also puts the table and the
PNGs (copied next to FILE) into FILE, in a section replaced on every rerun. What the
table measures is described in `compare.py`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from grpo_stream.analysis.compare import CompareError, compare_runs
from grpo_stream.analysis.compare_plot import plot_comparison
from grpo_stream.analysis.compare_table import markdown_report, summary_json


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "compare"


DOC_HEADER = """# Experiments

Each section below is written by `grpo-stream compare --write-doc` from the run folders
it names (the shipped sweeps, `grpo-stream sweep configs/sweeps/epochs.toml` and
`configs/sweeps/models.toml`, call it when their last point is done); rerunning it
replaces that section. A sweep that has not been run has no section here. Numbers,
conclusions and their uncertainty are generated from the runs' `metrics.jsonl`.
"""


def write_doc(doc: Path, section_id: str, markdown: str, images: list[Path]) -> None:
    """Put `markdown` (its image links rewritten) into `doc`'s section `section_id`,
    replacing an earlier one; the images are copied to DOC_STEM/SECTION_ID/ beside `doc`."""
    slug = _slug(section_id)
    img_dir = doc.parent / doc.stem / slug
    img_dir.mkdir(parents=True, exist_ok=True)
    for img in images:
        if not (img_dir / img.name).exists() or not img.samefile(img_dir / img.name):
            shutil.copyfile(img, img_dir / img.name)  # --out may be that folder already
        markdown = markdown.replace(f"]({img.name})", f"]({doc.stem}/{slug}/{img.name})")
    begin, end = f"<!-- compare:{slug} -->", f"<!-- /compare:{slug} -->"
    section = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = doc.read_text() if doc.is_file() else DOC_HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)


def compare_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="grpo-stream compare", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders, or a sweep folder (all its points)")
    ap.add_argument("--out", default=None, help="output folder (default: RUNS_PARENT/compare)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="reward for samples-to-threshold (default: halfway from the lowest "
                    "first to the highest last smoothed reward)")  # fmt: skip
    ap.add_argument("--smooth", type=int, default=3, help="trailing mean window (steps)")
    ap.add_argument("--title", default=None, help="heading (default: the output folder)")
    ap.add_argument("--write-doc", default=None, metavar="FILE", help="also write into FILE")
    ap.add_argument("--section", default=None, help="--write-doc's section id (default: title)")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        raise CompareError(f"--smooth: must be >= 1 (got {args.smooth})")
    runs, settings, thr = compare_runs(args.runs, args.threshold, args.smooth)
    out = Path(args.out) if args.out else runs[0].path.parent / "compare"
    out.mkdir(parents=True, exist_ok=True)
    title = args.title or out.resolve().parent.name
    images = plot_comparison(runs, settings, thr, out)
    md = markdown_report(title, runs, settings, thr, args.smooth, [i.name for i in images])
    (out / "compare.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(summary_json(runs, settings, thr), indent=1))
    if args.write_doc:
        write_doc(Path(args.write_doc), args.section or title, md, images)
    print(md)
    print(f"[compare] {len(runs)} runs in {len(settings)} settings -> {out}")
    return 0
