"""Integration: `python -m bench.gpu_smoke --device cpu` (the GPU smoke test's code path, at
small sizes) runs as the GPU machine would run it, and writes its figures.

It trains two bf16 steps through the real StepRunner and fused loss, the same under FSDP2
with one gloo rank through torch.distributed.run, and gathers a state dict whose names and
shapes must be the Hugging Face ones. On the GPU machine it runs without vLLM, pydantic
wheels carried; importing the script must pull in none of vLLM, pydantic or zarr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_module_imports_nothing_the_gpu_machine_lacks() -> None:
    code = (
        "import sys, bench.gpu_smoke; "
        "print(sorted(m for m in ('vllm', 'pydantic', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_gpu_smoke_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-cpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_smoke", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    figures = {f["name"]: f for f in result["figures"]}
    assert set(figures) == {"tokens_per_s_vs_bare_fwd_bwd", "fused_peak_memory_vs_naive",
                            "nonfinite_losses", "fsdp_state_dict_mismatches"}  # fmt: skip
    for f in figures.values():
        assert set(f) == {"name", "value", "unit", "op", "goal", "ok"}
    assert figures["nonfinite_losses"]["value"] == 0
    assert figures["fsdp_state_dict_mismatches"]["value"] == 0
    fsdp = result["config"]["fsdp"]
    assert fsdp["backend"] == "gloo" and fsdp["tensors"] == 2 * 9 + 3  # 2 layers + 3
    assert len(fsdp["losses"]) == len(result["config"]["throughput"]["losses"]) == 2
    # one [rows*T, V] block against the whole [N, V] logits, log-softmax and gradients
    assert figures["fused_peak_memory_vs_naive"]["value"] < 0.25
    assert figures["tokens_per_s_vs_bare_fwd_bwd"]["value"] > 0
