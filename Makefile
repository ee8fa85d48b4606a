# Development commands. `make test` and `make demo` install into .venv first when it is missing
# or when the build inputs changed, so each works alone on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.perfml-installed
# Development pins torch; the library itself accepts a range (pyproject.toml).
TORCH_PIN := torch==2.13.0
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh)

.PHONY: install test test-fast demo bench lint format clean

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=77" wheel
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[dev]"
	$(BIN)/python -c "import perfml._backend as b; e = b.extension_error(); print('perfml._C:', 'built' if e is None else 'not built (' + e + ')')"
	touch $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	$(MAKE) install

# The unit tests (Triton kernels in interpret mode on CPU), then one pass of the benchmark
# suite (quick sizes, timing off), so the benchmarks cannot rot unnoticed.
test: $(STAMP)
	$(BIN)/python -m pytest tests -q --durations=10
	$(BIN)/python -m pytest benchmarks -q --benchmark-disable --perfml-quick

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

# Trains the tiny model on the standard library's sources (a few minutes on 2 CPU cores), then
# prints the quick comparison table of the fused ops against eager PyTorch, torch and compile.
demo: $(STAMP)
	$(BIN)/perfml demo --bench

bench: $(STAMP)
	$(BIN)/perfml bench --out bench-results/bench.jsonl
	$(BIN)/python -m pytest benchmarks -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf build dist *.egg-info perfml/_C*.so .pytest_cache .ruff_cache .benchmarks bench-results
