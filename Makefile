# SealedML — the two set-up commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# SECO's threshold HE runs in a side process: OpenFHE's wheel that works here imports on
# Python 3.10 only (see src/sealedml/seco/he/client.py). pyenv provides that interpreter.
HE_VENV   := .venv-he
HE_STAMP  := $(HE_VENV)/.installed
# `model convert` (owner-side, never in a TEE) needs TensorFlow and tf2onnx: 1.6 GB kept out of the
# main environment, in a side interpreter the command runs the conversion in.
CONVERT_VENV  := .venv-convert
CONVERT_STAMP := $(CONVERT_VENV)/.installed
HE_PYTHON ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.10*/bin/python3.10) $(shell command -v python3.10 2>/dev/null))

.PHONY: demo test bench lint clean he-venv convert-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev,demo]'
	touch $(STAMP)

$(HE_STAMP):
	@test -n "$(HE_PYTHON)" || { echo "SECO's HE side process needs Python 3.10: pyenv install 3.10, or make HE_PYTHON=/path/to/python3.10"; exit 1; }
	$(HE_PYTHON) -m venv $(HE_VENV)
	$(HE_VENV)/bin/pip install --quiet 'openfhe==1.6.1.0.22.4'
	$(HE_VENV)/bin/python -c 'import openfhe'
	touch $(HE_STAMP)

he-venv: $(HE_STAMP)

$(CONVERT_STAMP):
	$(PYTHON) -m venv $(CONVERT_VENV)
	$(CONVERT_VENV)/bin/pip install --quiet 'tensorflow-cpu==2.21.0' 'tf2onnx==1.17.0'
	$(CONVERT_VENV)/bin/python -c 'import tensorflow, tf2onnx'
	touch $(CONVERT_STAMP)

convert-venv: $(CONVERT_STAMP)

demo: $(STAMP)
	$(BIN)/sealedml demo

# The suite runs with HOME set to a fresh, empty directory (pip's cache stays where it
# is: installing happens above, with the caller's HOME), so a test that depends on an
# earlier run's leftovers in the home directory fails here as on a fresh machine.
test: $(STAMP) $(HE_STAMP) $(CONVERT_STAMP)
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
	rm -rf $(VENV) $(HE_VENV) $(CONVERT_VENV) build *.egg-info src/*.egg-info .pytest_cache
