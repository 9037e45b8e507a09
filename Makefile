# SealedML — the two set-up commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sealedml demo

# The suite runs with HOME set to a fresh, empty directory (pip's cache stays where it
# is: installing happens above, with the caller's HOME), so a test that depends on an
# earlier run's leftovers in the home directory fails here as on a fresh machine.
test: $(STAMP)
	@home=$$(mktemp -d "$${TMPDIR:-/tmp}/sealedml-test-home.XXXXXX"); \
	echo "running the suite with HOME=$$home (fresh and empty)"; \
	env -u XDG_CACHE_HOME -u XDG_CONFIG_HOME -u XDG_DATA_HOME -u SEALEDML_HOME HOME="$$home" \
		$(BIN)/python -m pytest -q tests; status=$$?; rm -rf "$$home"; exit $$status

bench: $(STAMP)
	$(BIN)/sealedml bench overhead --model mobilenetv2
	$(BIN)/sealedml bench overhead --model resnet50

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
