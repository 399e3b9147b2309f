# The two commands (see README.md):
#   make demo   sets up the project environment (.venv/, from requirements.lock) if needed, then
#               runs the federated LoRA demo on the embedded model
#   make test   the same set-up, then the lint and the whole test suite (what CI runs)
# Other Pythons and environments: PYTHON=python3.12 (the Python .venv/ is made from),
# VENV=/path/to/env (an existing environment; its torch is kept), SYSTEM_SITE_PACKAGES=1.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cllora-setup.stamp
# the environment's commands (flwr, torchrun, cllora) first on the PATH of what runs in it,
# without activating it (PYTHON itself is looked up on the caller's PATH)
IN_VENV := PATH="$(abspath $(VENV))/bin:$$PATH"
# pytest-xdist workers: CI has 2 cores and most tests use one; a test file stays on one worker
# (its module fixtures are built once). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
PYTEST := -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile
# make test-latest: a throw-away environment with the newest releases pyproject.toml allows
LATEST := build/latest

.PHONY: setup demo test lint format test-latest lock clean distclean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock scripts/setup.sh scripts/lock.py
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	@touch $(STAMP)

demo: setup
	$(IN_VENV) $(PY) -m cllora run examples/demo.yaml

test: lint
	$(IN_VENV) $(PY) $(PYTEST)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The newest releases: a fresh environment in build/latest, the lint and the whole suite in it;
# its versions are written to build/latest.lock (`make lock` adopts them).
test-latest:
	rm -rf $(LATEST) $(LATEST).lock
	PYTHON=$(PYTHON) VENV=$(LATEST) LATEST=1 bash scripts/setup.sh
	$(LATEST)/bin/python scripts/lock.py freeze $(LATEST).lock
	$(LATEST)/bin/python -m ruff check .
	$(LATEST)/bin/python -m ruff format --check .
	PATH="$(abspath $(LATEST))/bin:$$PATH" $(LATEST)/bin/python $(PYTEST)
	@echo "test-latest: passed on $$(date -u +%F) with $$($(LATEST)/bin/python scripts/lock.py versions)"

# Upgrade the lock: the newest releases, the whole suite, then their versions become the lock.
lock: test-latest
	cp $(LATEST).lock requirements.lock
	@echo "lock: requirements.lock now holds the set that just passed; make test rebuilds .venv"

clean:
	rm -rf build runs .pytest_cache .ruff_cache

distclean: clean
	rm -rf $(VENV)
