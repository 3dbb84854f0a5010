# llmpath — two commands for a newcomer: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PARTS := instrumentation backends gateway slo dashboards runbooks
STAMP := $(VENV)/.llmpath-installed
# Test files run on this many pytest-xdist workers, each file whole on one worker (its module fixtures start once).
# Most of the suite waits on real processes (engines, Prometheus, promtool), so two workers nearly halve it on 2
# cores; `make test PYTEST_WORKERS=0` runs it in one process. Tests marked `solo` (alerts on the real latency of live
# engines, which the other worker's load would raise) run afterwards without the workers, with mypy and the other
# Pythons' instrumentation suites beside them at the lowest priority (scripts/test.sh).
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
	VENV=$(VENV) PYTEST_WORKERS=$(PYTEST_WORKERS) scripts/test.sh $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Rewrite the committed generated artefacts (dashboards and runbooks of the default SLO spec).
regen: $(STAMP)
	$(BIN)/llmpath dashboards build -o dashboards/generated
	$(BIN)/llmpath runbooks build -o runbooks/generated

clean:
	rm -rf $(VENV) $(VENV)-3.* build .pytest_cache .ruff_cache .mypy_cache
