# dedupe developer tasks. Tests start their own redis-server processes on free loopback ports;
# they never use (or start) the system Redis service.

PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=
LINT_DIRS := $(wildcard dedupe devtools tests examples benchmarks)

.PHONY: help install redis-server venv test test-pythons lint format docs dist upgrade-deps demo bench bench-quick compat soak clean distclean

help:
	@echo "make install | test | test-pythons | lint | format | docs | dist | upgrade-deps | demo | bench | bench-quick | compat | soak | clean | distclean"

# Every development and test dependency at the version constraints/dev.txt pins (regenerate it
# with `make upgrade-deps`). The distribution is redis-single-flight (import name: dedupe). A
# venv made before the rename still holds this checkout as an editable "dedupe": drop that one.
CONSTRAINTS := constraints/dev.txt
DEV_EXTRAS := dev,docs,recipes
install: redis-server venv
	$(PYTHON) -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	@if $(PYTHON) -m pip show -f dedupe 2>/dev/null | grep -q '_editable_impl_dedupe.pth'; then \
		$(PYTHON) -m pip uninstall -q -y dedupe; fi
	$(PYTHON) -m pip install -q -c $(CONSTRAINTS) -e '.[$(DEV_EXTRAS)]'

# Re-resolve the pins on every supported Python found (throwaway venvs; see devtools/pins.py),
# then: review `git diff constraints/`, run `make install lint test`, commit.
PINS_ARGS ?=
upgrade-deps:
	$(PYTHON) -m devtools.pins $(PINS_ARGS)

# redis-server/redis-cli are only needed as binaries; the system service is never started.
redis-server:
	@if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then \
		echo "redis-server: $$(command -v redis-server)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing redis-server with apt-get (the system service will not be started)"; \
		policy=/usr/sbin/policy-rc.d; made_policy=0; \
		if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; chmod +x $$policy; made_policy=1; fi; \
		status=0; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server || status=$$?; \
		if [ $$made_policy = 1 ]; then rm -f $$policy; fi; \
		exit $$status; \
	else \
		echo "redis-server is not installed. Run:"; \
		echo "  sudo apt-get update && sudo apt-get install -y redis-server"; \
		echo "(you do not need to start the service; the tests start their own servers)"; \
		exit 1; \
	fi

venv:
	@if [ ! -x $(PYTHON) ]; then \
		echo "creating $(VENV) with $(PY)"; \
		$(PY) -m venv $(VENV) || { rm -rf $(VENV); echo "'$(PY) -m venv' failed (on Debian/Ubuntu: apt-get install -y python3-venv)"; exit 1; }; \
	fi

test:
	$(PYTHON) -m pytest -m "not soak" $(PYTEST_ARGS)

# The suite on every other supported Python found (pyenv's, python3.X on PATH, ...), each in a
# venv under .compat/; skips, and says so, the ones not installed. E.g. PYTHONS_ARGS=--compat
# (the `compat` tests only, as .ci/run does) or PYTHONS_ARGS="--only 3.12 -- -x".
PYTHONS_ARGS ?=
test-pythons:
	$(PYTHON) -m devtools.pythons $(PYTHONS_ARGS)

# The venv's Python (3.11) runs the tests; mypy checks the oldest (3.10) and newest (3.13) too.
lint:
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --python-version 3.13

format:
	$(VENV)/bin/ruff format $(LINT_DIRS)
	$(VENV)/bin/ruff check --fix $(LINT_DIRS)

# The API reference and the pages under docs/ (mkdocs.yml), into site/; a warning fails it.
docs:
	$(VENV)/bin/mkdocs build --strict --site-dir site

# The sdist and the wheel, into dist/. Install the wheel anywhere with
# `pip install dist/redis_single_flight-*.whl` (see the README's set-up section).
dist:
	rm -rf dist
	$(PYTHON) -m build --outdir dist .

# A private redis-server for examples/demo.py (which itself runs against any Redis URL).
demo:
	$(PYTHON) -m devtools.demo

# Benchmarks against raw redis-py and the peers (benchmarks/; results in benchmarks/results/).
# `make bench` takes about 15 minutes, `make bench-quick` about 3 (18 and 6 under a load of 6 on
# 2 cores: 7 Dec 2026). Extra flags: BENCH_ARGS=...
# bench-quick writes to benchmarks/results/quick/ (git-ignored): the committed full results stay.
# The main run (python -m benchmarks) also measures memory per flight and writes
# flight_memory.md beside latest.md, whose Targets table judges issue 23's targets.
BENCH_ARGS ?=

bench:
	$(VENV)/bin/pip install -e '.[bench]' -q
	$(PYTHON) -m benchmarks $(BENCH_ARGS)
	$(PYTHON) -m benchmarks.adapters --out benchmarks/results/adapters.md
	$(PYTHON) -m benchmarks.batches --out benchmarks/results/batches.md
	$(PYTHON) -m benchmarks.cachefill --out benchmarks/results/cachefill.md

bench-quick:
	$(VENV)/bin/pip install -e '.[bench]' -q
	$(PYTHON) -m benchmarks --quick --out benchmarks/results/quick $(BENCH_ARGS)
	$(PYTHON) -m benchmarks.adapters --calls 500 --repeats 3 --out benchmarks/results/quick/adapters.md
	$(PYTHON) -m benchmarks.batches --quick --out benchmarks/results/quick/batches.md
	$(PYTHON) -m benchmarks.cachefill --quick --out benchmarks/results/quick/cachefill.md

# The `compat` tests against the oldest and newest redis-py of each supported major, with and
# without hiredis, on Redis; and against Valkey 8.1 with the oldest and newest redis-py. Each
# redis-py in a plain venv under .compat/ (git-ignored). About 12 minutes on 2 cores. E.g.
# COMPAT_ARGS="--redis 8.2.0 --hiredis without --server valkey -- -x" (after --: pytest args).
COMPAT_ARGS ?=
compat:
	$(PYTHON) -m devtools.compat $(COMPAT_ARGS)

# Long stress run (tests/soak.py); not part of `make test`. --both: the standalone soak (kills,
# pauses, partitions, Redis restarts), then the Cluster soak (the same plus slot migrations held
# open), each for half of --minutes (5 in all); a summary each; fails if either does. E.g.
# SOAK_ARGS="--minutes 1 --seed 7". One mode alone: python -m tests.soak [--cluster].
SOAK_ARGS ?=
soak:
	$(PYTHON) -m tests.soak --both $(SOAK_ARGS)

clean:
	rm -rf build dist site *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis .compat
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# --- simulate (owned by the SIM helper) ---
# Deterministic simulation (tests/sim): the real protocol and Lua scripts under simulated
# processes, network, clocks and Redis. `make simulate SEED=123` replays one schedule (shrunk
# and printed if it fails); without SEED it runs schedules for MINUTES and prints the figures.
# STEPS: steps per schedule. SIM_ARGS: e.g. --package /path/to/checkout, --ignore KIND.
SEED ?=
STEPS ?= 60
MINUTES ?= 10
SIM_ARGS ?=
.PHONY: simulate
simulate:
	$(PYTHON) -m tests.sim --steps $(STEPS) $(if $(SEED),--seed $(SEED),--minutes $(MINUTES) --keep-going) $(SIM_ARGS)
