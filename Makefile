# Every target does its own set-up, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench image system venv clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,demo,postgres]'
	touch $(STAMP)

venv: $(STAMP)

# System pieces the tests talk to for real (Mosquitto, PostgreSQL, Docker); no-op when present.
system:
	sh scripts/setup-system.sh

test: system venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m coordinator.demo

clean:
	rm -rf $(VENV) build dist *.egg-info
