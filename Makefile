# Two set-up commands on a fresh machine (see README):
#   make quickstart   # creates .venv, installs mmpo, trains a tiny LLaVA with SFT then DPO on the shapes world
#   make test         # creates .venv, installs mmpo with test extras, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision pinned to releases that install without a GPU-sized download on the CI machines;
# any torch >= 2.4 works for mmpo itself.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv quickstart test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

quickstart: venv
	$(VENV)/bin/mmpo quickstart

test: venv
	$(PY) -m pytest -q -m "slow or not slow" --durations=15  # everything, then the 15 slowest; plain `pytest` skips the slow runs

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf runs lightning_logs .pytest_cache
