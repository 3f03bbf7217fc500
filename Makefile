# Each target does its own set-up (a virtualenv in .venv; see scripts/setup.sh).
PY := .venv/bin

.PHONY: setup demo test test-fast
setup:
	bash scripts/setup.sh

demo: setup
	$(PY)/r2f demo

test: setup
	$(PY)/pytest -q

test-fast: setup
	$(PY)/pytest -q -m "not slow"
