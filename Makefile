# The two commands of the README: `make serve` and `make test`. Both create .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 3000
PYTEST_ARGS ?=

.PHONY: serve test install demo load clean gpu-wheels build

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# SPO_MODEL=auto: sdxl-spo on a CUDA machine, the tiny demo model otherwise.
serve: $(STAMP)
	BENTOML_DO_NOT_TRACK=true $(BIN)/bentoml serve service.service:SPOService --host 0.0.0.0 --port $(PORT)

build: $(STAMP)
	BENTOML_DO_NOT_TRACK=true $(BIN)/bentoml build

test: $(STAMP)
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m spo_runtime generate "a watercolor fox in a snowy forest" --seed 42 -o demo.png

clean:
	rm -rf $(VENV) .pytest_cache
