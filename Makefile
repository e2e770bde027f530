# Two commands for a fresh clone: `make run` (set up + run the default experiment) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := WANDB_MODE=offline HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0

.PHONY: setup run test bench clean-results

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -r requirements.lock
	$(PY) -m pip install -qq --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

run: setup
	$(OFFLINE) $(PY) -m flbench $(ARGS)

test: setup
	$(OFFLINE) $(PY) -m pytest $(ARGS)

clean-results:
	rm -rf results
