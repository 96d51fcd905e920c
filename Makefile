# proponent: `make demo` (set up + train + index + serve + query digits), `make test` (set up + lint + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; override e.g. TORCH_SPEC="torch>=2.3" on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint typecheck unit bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) examples/demo.py --workdir demo_out

lint: setup
	$(VENV)/bin/ruff check proponent tests benchmarks examples

typecheck: setup
	$(VENV)/bin/mypy proponent

unit: setup
	$(PY) -m pytest -q

test: lint typecheck unit

bench: setup
	$(PY) benchmarks/index_throughput.py --quick
	$(PY) benchmarks/query_latency.py

clean:
	rm -rf demo_out .pytest_cache .mypy_cache .ruff_cache

# Build the Docker images and smoke-test them (root + Debian: installs docker.io/debootstrap if missing). See docs/docker.md.
.PHONY: docker-smoke
docker-smoke: setup
	SMOKE_PYTHON=$(abspath $(PY)) bash docker/smoke.sh
