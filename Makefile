# `make demo` audits the bundled agents and writes the HTML gallery; `make reports` regenerates the committed one;
# `make test` runs the test suite (which runs the gate too); `make gate` runs `gradaudit check` on the reference
# agents against their baselines (reports/baselines/). All set up .venv first.
# EXTRAS=dev,external also installs the third-party trainers of the external test group (as .ci/run does).
VENV ?= .venv
PYTHON ?= python3
EXTRAS ?= dev
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo reports graphviz test gate lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

# graphviz draws the reports' graphs: installed where we can (root on Debian), else the reports say how.
graphviz:
	@command -v dot >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -q >/dev/null && apt-get install -y --no-install-recommends graphviz >/dev/null || echo "graphviz not installed: reports will lack graphs"; }

demo: $(STAMP) graphviz
	$(BIN)/gradaudit demo --out reports

reports: $(STAMP) graphviz
	@command -v dot >/dev/null || { echo "make reports needs graphviz (apt-get install graphviz)"; exit 1; }
	$(BIN)/gradaudit demo --out reports

test: $(STAMP)
	$(BIN)/python -m pytest -q

gate: $(STAMP)
	$(BIN)/gradaudit check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
