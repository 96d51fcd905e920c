# proponent: `make demo` (set up + train + index + serve + query digits), `make test` (set up + lint + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; override e.g. TORCH_SPEC="torch>=2.3" on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

# Headless Chromium for the browser tests (tests/service/test_ui.py): Debian's package, never a browser download.
CHROMIUM ?= /usr/bin/chromium

.PHONY: setup browsers demo test lint typecheck unit bench clean docs-shots

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py proponent/query/_int8dot.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

browsers:
	@if [ -x "$(CHROMIUM)" ]; then echo "chromium: $(CHROMIUM)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
		sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "browsers: no $(CHROMIUM) and no apt-get: tests/service/test_ui.py will be skipped (set PROPONENT_CHROMIUM)"; fi

demo: setup
	$(PY) examples/demo.py --workdir demo_out

# ruff, then the layers between packages (import-linter contracts in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check proponent tests benchmarks examples docs/shots.py
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy proponent

unit: setup browsers
	$(PY) -m pytest -q

test: lint typecheck unit

# The web page's screenshots in docs/ (ui-query, ui-self-influence, ui-index) from a small demo index.
docs-shots: setup browsers
	PROPONENT_CHROMIUM=$(CHROMIUM) $(PY) docs/shots.py

bench: setup
	$(PY) benchmarks/index_throughput.py --quick
	$(PY) benchmarks/query_latency.py

clean:
	rm -rf demo_out .pytest_cache .mypy_cache .ruff_cache

# Build the Docker images and smoke-test them (root + Debian: installs docker.io/debootstrap if missing). See docs/docker.md.
.PHONY: docker-smoke
docker-smoke: setup
	SMOKE_PYTHON=$(abspath $(PY)) bash docker/smoke.sh
