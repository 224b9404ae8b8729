# greenmail: the two commands a newcomer needs.
#   make run   - venv, install, start the development sink and the daemon (conf/greenmail.toml)
#   make test  - venv, install with test extras, lint, run every test
#   make deb   - the Debian package, in build/deb/ (needs debhelper, dh-python, python3-all; lintian)
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
SINK_LISTEN ?= 127.0.0.1:2525

.PHONY: run test lint install clean deb deb-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A plain (not editable) install: no import hook at start-up, which a process per enqueued message
# would pay for; reinstalled (without its dependencies) whenever a source file changes.
SOURCES := $(wildcard greenmail/*.py) bin/greenmail

$(VENV)/.deps: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q '.[test]'
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install -q --no-deps --force-reinstall .
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	@mkdir -p var
	@$(BIN)/greenmail sink --listen $(SINK_LISTEN) --maildir var/sink & sink=$$!; \
	trap '' INT TERM; \
	echo "sink on $(SINK_LISTEN) storing in var/sink/new; in another terminal:"; \
	echo "  export GREENMAIL_CONFIG=$$PWD/conf/greenmail.toml"; \
	echo "  echo 'Subject: hi' | $(BIN)/greenmail enqueue --from me@example.org --to you@example.net"; \
	echo "  $(BIN)/greenmail queue list"; \
	(trap - INT TERM; exec $(BIN)/greenmail run --config conf/greenmail.toml); status=$$?; \
	kill $$sink 2>/dev/null; wait $$sink; \
	exit $$status

lint: $(VENV)/.installed
	$(BIN)/ruff check greenmail tests bench
	$(BIN)/ruff format --check greenmail tests bench

test: lint
	$(BIN)/python -m pytest

# Built from a copy of the working tree (dpkg-buildpackage writes beside the source directory and
# cleans it); lintian's errors fail the build.
DEB_DIR = build/deb
DEB = $(DEB_DIR)/greenmail_$(shell dpkg-parsechangelog -S Version 2>/dev/null)_all.deb
deb:
	dpkg-checkbuilddeps
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./var --exclude='*.egg-info' \
	    --exclude=__pycache__ --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude=./.hypothesis \
	    -cf - . | tar -C $(DEB_DIR)/src -xf -
	cd $(DEB_DIR)/src && dpkg-buildpackage -us -uc -b
	lintian --fail-on error --info $(DEB)
	@echo "built $(DEB)"

# Installs the package on THIS machine as its MTA (removing any other), sends mail through it
# and purges it again: for CI and throwaway machines only.
deb-test: deb $(VENV)/.installed
	GREENMAIL_DEB=$(DEB) $(BIN)/python -m pytest tests/package -v -p no:cacheprovider

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis
