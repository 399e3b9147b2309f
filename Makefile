# The two commands (see README.md):
#   make demo   installs what is missing, then runs the federated LoRA demo on the embedded model
#   make test   installs what is missing, then runs the whole test suite and the lint
PYTHON ?= python3
STAMP := build/setup.stamp

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
	$(PYTHON) -m pytest -q

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

clean:
	rm -rf build runs .pytest_cache .ruff_cache
