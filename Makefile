# nanorl: the two commands a user needs are `make demo` and `make test`; both set everything up first.
#   make demo   run the main job (the offline pipeline on the built-in task, on this CPU)
#   make test   lint, format check and the whole test suite (what CI runs)
#   make bench  the CPU benchmarks in bench/
# A user with a GPU picks the torch build: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev,triton
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.nanorl-installed
PLUGINS    := plugins/aqua plugins/gsm8k plugins/lambda

# Tests and the demo never reach the Hugging Face hub or wandb's servers.
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# The pinned torch goes in first, and only where no torch is present: an open range would otherwise pull a
# multi-GB CUDA build. Everything else is installed editable, the plugins as their own distributions.
$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" $(addprefix -e ,$(PLUGINS))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nanorl pipeline --task arith --preset tiny

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmark that runs as it is: not the helper modules (bench/_*.py), nor copy_probe.py (needs a run folder)
# and nanochat_anchor.py (needs nanochat's source), which are run by hand.
BENCHES    := $(filter-out bench/_% bench/copy_probe.py bench/nanochat_anchor.py,$(sort $(wildcard bench/*.py)))

bench: $(STAMP)
	for b in $(BENCHES); do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info plugins/*/src/*.egg-info
