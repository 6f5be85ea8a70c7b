# Every target does its own set-up, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo bench image system venv dist kit clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[all,test,demo,postgres,bench]'
	touch $(STAMP)

venv: $(STAMP)

# System pieces the tests talk to for real (Mosquitto, PostgreSQL, Docker); no-op when present.
system:
	sh scripts/setup-system.sh

# Everything: unit, contract over every backend, system (real processes, Docker, PostgreSQL).
test: system venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The inner loop (< 60 s): unit tests and the contract suites on the in-memory backends only.
test-fast: venv
	$(BIN)/python -m pytest tests/unit tests/contract -m "not real and not postgres" $(PYTEST_ARGS)

# The images dockercomp/worker:latest (the agent, for volunteers) and dockercomp/coordinator:latest
# (for docker-compose.yml); works offline (with no image registry it builds a local Debian base
# once per machine). Skips a build when the image matches the sources.
image: venv
	PYTHON=$(BIN)/python sh scripts/build-image.sh
	PYTHON=$(BIN)/python ROLE=installer sh scripts/build-image.sh
	PYTHON=$(BIN)/python ROLE=coordinator sh scripts/build-image.sh

demo: venv
	$(BIN)/python -m dockercomp.demo $(DEMO_ARGS)

# Throughput and latency against the raw paho + Mosquitto round trip (2.5-5 min); results JSON in
# bench/results/. Smaller runs: make bench BENCH_ARGS=--quick (see python -m bench --help).
bench: system venv
	$(BIN)/python -m bench $(BENCH_ARGS)

# The sdist and the wheel in dist/ (PyPA's build from the package index; offline, the wheel
# alone through pip). The wheel's top level is only dockercomp/ (tests/system/test_wheel.py).
dist: venv
	rm -rf dist
	if $(BIN)/pip install -q build; then $(BIN)/python -m build --outdir dist .; \
	else $(BIN)/pip wheel -q --no-deps --wheel-dir dist .; fi

# The volunteers' kit in broker-config/kit/ (installer/README.md): the images, then `kit build`
# for the address it will be served at (KIT_URL; `dockercomp coordinator kit serve` for a try).
KIT_URL ?= http://127.0.0.1:8080
kit: image
	$(BIN)/dockercomp coordinator kit build --url $(KIT_URL)

clean:
	rm -rf $(VENV) build dist *.egg-info
