# grpo-stream: the two commands of the contract, and the benchmarks.
#   make demo   set up .venv if missing, then run the whole pipeline on the CPU default
#   make test   set up .venv if missing, then lint + the whole test suite
#   make bench  every benchmark in bench/ (writes bench/results/*.json)
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/cpu.toml
ARGS ?=
# every runnable module of bench/ (tests/unit/test_make_bench.py keeps the list whole);
# gpu_smoke needs CUDA: without it, it says so in one line and make bench goes on
BENCHES := logprobs buffer generator reward_model learner lora checkpoint sync_overlap \
	choices pipeline simulate gpu_smoke
BENCH_ARGS_gpu_smoke := --if-cuda

.PHONY: env demo test lint unit integration bench clean

env:
	@bash scripts/setup_env.sh

demo: env
	$(PY) -m grpo_stream.cli run --config $(CONFIG) $(ARGS)

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -m "not gpu" -p no:cacheprovider --durations=30 $(ARGS)

unit: env
	$(PY) -m pytest tests/unit -m "not gpu" $(ARGS)

integration: env
	$(PY) -m pytest tests/integration -m "not gpu" $(ARGS)

bench: env
	@set -e; $(foreach b,$(BENCHES),echo "== bench/$(b)"; $(PY) -m bench.$(b) $(BENCH_ARGS_$(b));)

clean:
	rm -rf runs .pytest_cache .ruff_cache
