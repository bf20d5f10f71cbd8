# The two commands of the README: `make demo` and `make test`. Both create the virtualenv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the 2.13.0 CPU wheel on disk. GPU hosts: `make TORCH_SPEC=torch==2.13.0 ...` from PyPI gives the CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/pip --disable-pip-version-check -q

.PHONY: demo test lint faults install clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing $(TORCH_SPEC) first, then reprise and its dependencies into $(VENV) ..."
	@$(PIP) install "$(TORCH_SPEC)" 2>$(VENV)/pip.log || { cat $(VENV)/pip.log; exit 1; }
	@$(PIP) install -e '.[dev]' 2>$(VENV)/pip.log || { cat $(VENV)/pip.log; exit 1; }
	@$(PY) -c "import torch, diffusers, celery, qdrant_client, ops.cli"
	@touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/reprise demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

# The checks .ci/run makes beside the tests: the layer contract (pyproject's [tool.importlinter]) and ruff.
lint: install
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

faults: install
	HF_HUB_OFFLINE=1 $(PY) -m ops.faults --json faults.json

clean:
	rm -rf var .pytest_cache
