# Set-up and the two front-door commands. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= out/demo

.PHONY: install demo test test-fast test-gpu bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: the CPU build lies on this machine's disk; an unpinned torch would pull a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	$(VENV)/bin/attn-export onnx --preset tiny -o $(DEMO_DIR)/tiny.onnx --force
	$(VENV)/bin/attn-export verify $(DEMO_DIR)/tiny.onnx --report $(DEMO_DIR)/verify.json
	$(VENV)/bin/attn-export inspect $(DEMO_DIR)/tiny.onnx

test: $(STAMP)
	$(VENV)/bin/ruff check attn_export tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -n 2 -q -p no:cacheprovider --durations=10

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" -p no:cacheprovider

# On a machine with an NVIDIA GPU and TensorRT: the gpu-marked tests and the end-to-end run, one JSON report.
test-gpu: $(STAMP)
	$(PY) tests/gpu_e2e.py --out out/gpu-report.json

# The goals in docs/benchmarks.md are stated for 2 threads, whatever the machine has.
bench: $(STAMP)
	$(PY) bench/run_benchmarks.py --threads 2 --interleaved 32:2,64:2,128:2,256:2

clean:
	rm -rf $(VENV) out build *.egg-info
