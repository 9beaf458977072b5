# Two commands do all set-up on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# The CPU wheel index is used only when the pinned wheel is not already available locally.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install bench bench-quick bench-llm bench-runtime test test-all clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first and pinned, so no later requirement can pull a CUDA build.
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" || \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[bench,test]" "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch, sys; sys.exit('a CUDA build of torch got installed' if torch.version.cuda else 0)"
	touch $@

install: $(VENV)/.installed

bench: install
	$(VENV)/bin/cpuboost bench

bench-quick: install
	$(VENV)/bin/cpuboost bench --quick

bench-llm: install
	$(VENV)/bin/cpuboost bench --llm

bench-runtime: install
	$(VENV)/bin/cpuboost bench --runtime

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

test-all: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m ""

clean:
	rm -rf $(VENV) build *.egg-info
