# Fresh-clone entry points: `make demo` (main job, CPU) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Install torch first: a pinned CPU wheel, so megatron-core's open torch range installs nothing more.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: setup demo test vniah
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/pretrain_longvila.py --demo $(ARGS)

# Not in CI: trains a tiny LongVILA on a synthetic needle task (a few minutes), then V-NIAH on CPU ranks.
vniah: $(VENV)/.installed
	$(PY) examples/vniah_demo.py $(ARGS)

# Fails on a skip that is not allowed (a GPU-only dependency, a Megatron-LM checkout) and on a process left running;
# -rs prints every skip's reason (tests/_rules, README).
test: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests
