# Developer entry points. `make test` builds .venv on first use (a few minutes), then is quick.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.eclipse-installed

.PHONY: venv demo test check-reference

venv: $(STAMP)

# Re-run the (idempotent) installer whenever what it installs may have changed.
$(STAMP): tools/install.sh requirements.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash tools/install.sh $(PY)
	@touch $@

demo: venv
	$(PY) tools/synthetic_benchmark.py --output output/demo

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

check-reference: venv
	@set -e; for manifest in tests/fixtures/*/manifest.json; do \
		echo "== $$(dirname $$manifest)"; \
		$(PY) tools/check_reference.py $$(dirname $$manifest); \
	done
