# sdserve: every target sets up what it needs on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= .cache
PYTEST_ARGS ?=

# Debian packages the build, the tests and the demo need.
APT_PACKAGES := python3 python3-venv python3-dev gcc pkg-config libsystemd-dev \
	wrk systemd-container debootstrap iproute2 procps curl ca-certificates chromium fuse3 \
	podman runc haproxy prometheus valgrind

# Extra prerequisites of `make test`, appended to by the fragments included below.
TEST_PREREQS :=

.PHONY: help apt venv lint format test test-unit bench fuzz demo clean

help:
	@echo "make demo   - run the demo service under load through restarts and reloads, print the report"
	@echo "make test   - linters, unit and process tests, system tests in a real systemd"
	@echo "make bench  - benchmarks (ratios against a baseline measured in the same run)"
	@echo "make fuzz   - random interleavings of reloads, stops, kills and faults under load"
	@echo "make lint   - ruff check, ruff format --check, mypy --strict"

$(CACHE)/apt.stamp: Makefile
	@mkdir -p $(CACHE)
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

apt: $(CACHE)/apt.stamp

$(BIN)/.stamp: pyproject.toml $(CACHE)/apt.stamp
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/.stamp

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

-include tests/system/system.mk
-include packaging/packaging.mk

test: lint $(TEST_PREREQS)
	$(BIN)/pytest $(PYTEST_ARGS) tests

test-unit: venv
	$(BIN)/pytest $(PYTEST_ARGS) tests --ignore=tests/system

$(BIN)/.bench-stamp: pyproject.toml $(BIN)/.stamp
	$(BIN)/pip install -q -e '.[dev,bench]'
	@touch $@

bench: venv $(BIN)/.bench-stamp
	$(BIN)/python -m tests.bench

# Random interleavings of lifecycle events under load (tests/interleaving.py); CI runs a few
# seeds of it in `make test`. A failure names its seed: SDS_FUZZ_SEEDS=SEED make fuzz.
SDS_FUZZ_SEEDS ?= 1-40
SDS_FUZZ_EVENTS ?= 16
fuzz: venv
	SDS_FUZZ_SEEDS=$(SDS_FUZZ_SEEDS) SDS_FUZZ_EVENTS=$(SDS_FUZZ_EVENTS) \
		$(BIN)/pytest -s -q $(PYTEST_ARGS) tests/test_interleaving.py

demo: venv
	$(BIN)/python -m sdserve.drill.demo

clean:
	rm -rf $(VENV) build dist report *.egg-info .mypy_cache .ruff_cache .pytest_cache
