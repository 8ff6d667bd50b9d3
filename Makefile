# The two commands of the README:
#   make run   - install into .venv, create/upgrade var/listserv.db, run the daemon on 127.0.0.1:8025
#   make test  - install into .venv, lint, run the whole test suite
VENV ?= .venv
CONFIG ?= config/listserv.example.toml
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: run test install lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/listserv --config $(CONFIG) init
	$(BIN)/listserv --config $(CONFIG) serve

lint: install
	@tracked="$$(git ls-files -ci --exclude-standard 2>/dev/null)"; \
	if [ -n "$$tracked" ]; then \
		echo "tracked files that .gitignore ignores (git rm -r --cached them):"; \
		echo "$$tracked" | head -n 20; exit 1; fi
	$(BIN)/ruff check listserv tests scripts
	$(BIN)/ruff format --check listserv tests scripts
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest

bench: install
	$(BIN)/python scripts/bench_fanout.py --members 10000

clean:
	rm -rf $(VENV) var/*.db var/*.db-wal var/*.db-shm
