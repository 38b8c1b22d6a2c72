# Two commands for a fresh machine (see README):  make serve   |   make test
PYTHON ?= python3
VENV ?= .venv
LABEL_STUDIO_VENV ?= .ls-venv
PORT ?= 9090
LABEL_STUDIO_PORT ?= 8080
export LABEL_STUDIO_PORT
export LABEL_STUDIO_VENV

.PHONY: serve test lint install install-label-studio install-browser install-postgres label-studio bench mutation clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-label-studio:
	bash scripts/install-label-studio.sh

# Headless Chromium (Debian packages) for the browser test of Label Studio's UI.
install-browser:
	bash scripts/install-browser.sh

# PostgreSQL (Debian packages): the store tests run on SQLite and on a throwaway PostgreSQL server they start.
install-postgres:
	bash scripts/install-postgres.sh

# Label Studio on http://127.0.0.1:$(LABEL_STUDIO_PORT), set up to call a backend on this machine
# (its built-in address block less loopback; see README, "Label Studio's address block").
label-studio: install install-label-studio
	VENV=$(VENV) bash scripts/label-studio.sh

# The backend server with the default model (ViT-B/16, OpenAI weights) on port $(PORT).
serve: install
	$(VENV)/bin/labelstudio-maskclip serve --port $(PORT)

# Lint, format check and type check (configured in pyproject.toml), then unit tests and end-to-end tests
# against a real Label Studio started on loopback by the tests (and a real PostgreSQL for the store's tests).
test: install install-label-studio install-browser install-postgres lint
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check labelstudio_maskclip tests benchmarks scripts
	$(VENV)/bin/ruff format --check labelstudio_maskclip tests benchmarks scripts
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/python benchmarks/run.py

# Mutation testing of one module (or a glob) against its own tests, with mutmut (docs/mutation.md):
#   make mutation MODULE=labelstudio_maskclip/training/validation.py TESTS=tests/test_training.py
# MUTANTS=... re-runs only those mutants (names as `mutmut results` prints them).
mutation: install
	PYTHON=$(VENV)/bin/python scripts/mutation.sh $(MODULE) $(TESTS) -- $(MUTANTS)

clean:
	rm -rf $(VENV) $(LABEL_STUDIO_VENV) build *.egg-info
