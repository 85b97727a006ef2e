# The README and CI both call these targets; keep them the only entry points.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve test test-slow lint typecheck bench settings-doc dist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on embedded defaults: sqlite driver, a local directory upstream.
serve: $(STAMP)
	$(BIN)/python -m imagecache.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

bench: $(STAMP)
	$(BIN)/python bench/run.py

# docs/settings.md is generated from the settings model; run after changing a setting.
settings-doc: $(STAMP)
	$(BIN)/python -m imagecache.settings_doc > docs/settings.md

# A wheel and an sdist in dist/, built by the project's own backend (hatchling).
dist: $(STAMP)
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache dist
