# greenmail: the two commands a newcomer needs.
#   make run   - venv, install, start the development sink and the daemon (conf/greenmail.toml)
#   make test  - venv, install with test extras, lint, run every test
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
SINK_LISTEN ?= 127.0.0.1:2525

.PHONY: run test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat && $(BIN)/python -m compileall -q greenmail
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	@mkdir -p var
	@set -e; \
	$(BIN)/greenmail sink --listen $(SINK_LISTEN) --maildir var/sink & sink=$$!; \
	trap 'kill $$sink 2>/dev/null; wait $$sink 2>/dev/null' EXIT INT TERM; \
	echo "sink on $(SINK_LISTEN) storing in var/sink/new; enqueue with:"; \
	echo "  echo 'Subject: hi' | $(BIN)/greenmail enqueue --config conf/greenmail.toml --from me@example.org --to you@example.net"; \
	$(BIN)/greenmail run --config conf/greenmail.toml

lint: $(VENV)/.installed
	$(BIN)/ruff check greenmail tests
	$(BIN)/ruff format --check greenmail tests

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis
