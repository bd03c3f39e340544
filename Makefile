# The usual verbs. `make install` builds .venv from pyproject.toml; everything else uses it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint fmt bench demo run clean

$(BIN)/harvest: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/harvest

test: install
	$(BIN)/pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check crawler tests bench
	$(BIN)/mypy crawler tests bench
	$(BIN)/lint-imports

fmt: install
	$(BIN)/ruff format crawler tests

bench: install
	$(BIN)/python -m bench

demo: install
	$(BIN)/harvest demo

run: install
	$(BIN)/harvest run configs/model-827184.toml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis demo
