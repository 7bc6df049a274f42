# One entry point: `make demo` runs the main job on a fresh machine, `make test` runs the tests.
# Both create .venv and install the project first; `make data` installs Fashion-MNIST (Debian package).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: all venv data postgres demo test clean

all: demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

data:
	@if [ -f $(FMNIST) ]; then echo "Fashion-MNIST: $(dir $(FMNIST))"; \
	elif [ "$$(id -u)" = 0 ]; then (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' or pass --data-dir" >&2; exit 1; fi

# PostgreSQL's server binaries for the replica tests (tests/test_ledger_postgres.py): installed when missing and the
# user is root; otherwise those tests fail and say what to run.
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	else echo "PostgreSQL is missing: run 'sudo apt-get install postgresql'; the tests that need it will fail" >&2; fi

# The main job on the default dataset.
demo: venv data
	PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m bench.demo

test: venv postgres
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs demo_output .pytest_cache
