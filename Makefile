# pdl: the two jobs are `make book` and `make test`; both run the set-up first.
VENV := .venv/bin
export PDL_PROGRESS ?= 1

.PHONY: setup book lab test test-fast check test-notebooks test-pytest export clean-notebooks

setup:
	bash tools/setup.sh

export: setup
	$(VENV)/nbdev_export

book: setup
	$(VENV)/pdl book --profile cpu

# JupyterLab on the notebooks (as root it needs --allow-root); LAB_ARGS adds options, e.g. LAB_ARGS="--port 9999"
lab: setup
	$(VENV)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

test: setup
	$(MAKE) test-notebooks test-pytest

# the quick loop while editing (about two minutes): pytest without the tests marked slow
test-fast: setup
	PDL_PROGRESS=0 $(VENV)/python -m pytest -q -p no:cacheprovider -m "not slow"

# library in sync with the notebooks, notebooks clean, no stale modules, ruff (CI runs it before the tests)
check: setup
	$(VENV)/python tools/check.py

test-notebooks:
	PDL_PROGRESS=0 $(VENV)/nbdev_test --n_workers 2 --do_print --timing

test-pytest:
	PDL_PROGRESS=0 $(VENV)/python -m pytest -q -p no:cacheprovider --durations=15

clean-notebooks:
	$(VENV)/nbdev_clean
