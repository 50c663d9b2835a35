# grpo-stream: the two commands of the contract, and the benchmarks.
#   make demo   set up .venv if missing, then run the whole pipeline on the CPU default
#   make test   set up .venv if missing, then lint + the whole test suite
#   make bench  every benchmark in bench/ (writes bench/results/*.json)
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/cpu.toml
ARGS ?=
BENCHES := logprobs buffer generator learner

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
	@set -e; for b in $(BENCHES); do echo "== bench/$$b"; $(PY) -m bench.$$b; done

clean:
	rm -rf runs .pytest_cache .ruff_cache
