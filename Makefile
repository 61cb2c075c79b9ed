# pdl: the two jobs are `make book` and `make test`; both run the set-up first.
VENV := .venv/bin
export PDL_PROGRESS ?= 1

.PHONY: setup book test test-notebooks test-pytest export clean-notebooks

setup:
	bash tools/setup.sh

export: setup
	$(VENV)/nbdev_export

book: setup
	$(VENV)/pdl book --profile cpu

test: setup
	$(MAKE) test-notebooks test-pytest

test-notebooks:
	PDL_PROGRESS=0 $(VENV)/nbdev_test --n_workers 1 --do_print --timing

test-pytest:
	PDL_PROGRESS=0 $(VENV)/python -m pytest -q -p no:cacheprovider

clean-notebooks:
	$(VENV)/nbdev_clean
