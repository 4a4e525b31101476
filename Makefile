# Every target creates its own virtual environment; nothing else is needed beforehand.
#   make test                       the whole test suite on python3
#   make test PYTHON=python3.13     ... on another interpreter (its own .venv-python3.13)
#   make demo | bench | lint | proto
PYTHON ?= python3
VENV ?= .venv$(if $(filter python3,$(PYTHON)),,-$(PYTHON))
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench lint proto clean

$(STAMP): pyproject.toml setup.py $(wildcard otlp_middleware/profiling/_native/*.c)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# Build the C extensions next to the sources too (editable installs import from here).
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

bench: $(STAMP)
	$(BIN)/python bench/bench_cpu.py
	$(BIN)/python bench/bench_middleware.py
	$(BIN)/python bench/bench_background.py
	$(BIN)/python bench/bench_split.py
	$(BIN)/python bench/bench_tiers.py
	$(BIN)/python bench/bench_memory.py

lint: $(STAMP)
	$(BIN)/ruff check otlp_middleware tests bench examples
	$(BIN)/mypy

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. \
		proto/otlp_middleware/pprof/profile.proto

clean:
	rm -rf .venv .venv-* build *.egg-info otlp_middleware/profiling/*.so profiles received
