# Two commands on a fresh machine:  `make run`  (the system on the embedded default)
#                                   `make test` (the whole suite, SQLite and MariaDB + Redis)
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
# The first interpreter that is Python 3.12 or newer (pyenv's shims included).
PYTHON ?= $(shell for p in python3.12 python3.13 python3; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
  >/dev/null 2>&1 && { echo $$p; break; }; done)
UV := $(PYTHON) -m uv

.PHONY: bootstrap run test test-sqlite test-mysql lint bench

bootstrap:
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	@$(UV) sync --frozen --python "$$($(PYTHON) -c 'import sys; print(sys.executable)')"

run: bootstrap
	$(UV) run auto-session serve

test: bootstrap
	$(UV) run python -m tests.run_all

test-sqlite: bootstrap
	$(UV) run pytest --backend sqlite

test-mysql: bootstrap
	$(UV) run pytest --backend mysql

lint: bootstrap
	$(UV) run ruff check .
