# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "braintumor needs Python >= 3.11"' \
		|| { echo "error: braintumor needs Python >= 3.11 (set PYTHON=python3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/braintumor demo --out demo-run

browser:
	bash scripts/install_chromium.sh

test: $(STAMP) browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-run runs .pytest_cache
