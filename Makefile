# llmpath — two commands for a newcomer: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PARTS := instrumentation backends gateway slo dashboards runbooks
STAMP := $(VENV)/.llmpath-installed
# Test files run on this many pytest-xdist workers, each file whole on one worker (its module fixtures start once).
# Most of the suite waits on real processes (engines, Prometheus, promtool), so two workers nearly halve it on 2
# cores; `make test PYTEST_WORKERS=0` runs it in one process. Tests marked `solo` (alerts on the real latency of
# live engines, which the other worker's load would raise) run afterwards, alone. Exit status 5 (nothing selected,
# as when PYTEST_ARGS picks files of one kind only) fails only when neither run selected a test.
PYTEST_WORKERS ?= 2

.PHONY: install demo test lint regen clean

# Editable installs of every part (and the `llmpath` CLI at .venv/bin/llmpath), redone when a pyproject changes.
$(STAMP): pyproject.toml $(foreach p,$(PARTS),$(p)/pyproject.toml) scripts/bootstrap.sh
	PYTHON=$(PYTHON) scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	scripts/system-deps.sh demo
	$(BIN)/llmpath demo $(DEMO_ARGS)

test: $(STAMP)
	scripts/system-deps.sh test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not solo" $(PYTEST_ARGS); parallel=$$?; \
	$(BIN)/python -m pytest -m solo $(PYTEST_ARGS); solo=$$?; \
	for status in $$parallel $$solo; do [ $$status -eq 0 ] || [ $$status -eq 5 ] || exit 1; done; \
	[ $$parallel -ne 5 ] || [ $$solo -ne 5 ] || { echo "make test: no test selected"; exit 1; }
	scripts/compat.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Rewrite the committed generated artefacts (dashboards and runbooks of the default SLO spec).
regen: $(STAMP)
	$(BIN)/llmpath dashboards build -o dashboards/generated
	$(BIN)/llmpath runbooks build -o runbooks/generated

clean:
	rm -rf $(VENV) $(VENV)-3.* build .pytest_cache .ruff_cache .mypy_cache
