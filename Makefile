# Fresh machine: `make demo` runs the whole pipeline on synthetic data, `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_data

.PHONY: venv demo test bench clean mutation

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision pinned to the pair that spikingjelly 2.0.0 accepts and that the machines carry.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Bytecode caching on even where the machine turns it off (PYTHONDONTWRITEBYTECODE): the suite
# starts hundreds of Python processes, and without the cache each collection of the tests
# rewrites their asserts again (5 s of CPU each).
test: $(STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -n auto --dist worksteal --durations=15

# Mutation testing of the core modules (not part of `make test`; hours on 2 cores, see
# tests/MUTANTS.md). One cluster: make mutation CLUSTERS=atomic
mutation: $(STAMP)
	$(BIN)/pip install --quiet -e '.[mutation]'
	nice -n 19 $(BIN)/python scripts/mutation.py $(CLUSTERS)

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO_DIR)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_convert.py
	$(BIN)/python benchmarks/bench_frames.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
