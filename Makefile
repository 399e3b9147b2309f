# The two commands (see README.md):
#   make demo   installs what is missing, then runs the federated LoRA demo on the embedded model
#   make test   installs what is missing, then runs the whole test suite and the lint
PYTHON ?= python3
STAMP := build/setup.stamp
# pytest-xdist workers: CI has 2 cores and most tests use one; a test file stays on one worker
# (its module fixtures are built once). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2

.PHONY: setup demo test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh
	@mkdir -p build && touch $(STAMP)

demo: setup
	$(PYTHON) -m cllora run examples/demo.yaml

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

clean:
	rm -rf build runs .pytest_cache .ruff_cache
