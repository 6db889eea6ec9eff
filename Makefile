# The README's commands: `make serve`, `make test`, `make weights`. Each creates .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
HOST ?= 0.0.0.0
PORT ?= 3000
PYTEST_ARGS ?=
# Idle OpenMP workers sleep instead of spinning: on cores shared with other busy processes, spinning
# workers wait for a descheduled one at every parallel region and a step takes many times longer
# (benchmarks/RESULTS.md, contention). Inherited by the server, its training jobs and the tests.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: serve test test-fast install install-dev demo load clean gpu-wheels build weights weights-plan docs

# The runtime: what the server imports (requirements.txt), and the package itself (the spo-serve command).
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull whatever build is newest.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# Tests and benchmarks on top (requirements-dev.txt): only `make test` and the benchmark targets need them.
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(DEV_STAMP)

install: $(STAMP)
install-dev: $(DEV_STAMP)

# SPO_MODEL=auto: sdxl-spo on a CUDA machine, the tiny demo model otherwise.
# SPO_TORCH_THREADS=1 unless set: one intra-op thread per worker kept the open-loop p95 within 1.14x with two
# busy processes on a 2-core host, where torch's default (a thread per core) collapsed (benchmarks/RESULTS.md).
# `spo-serve` (spo_runtime/__main__.py: serve) holds the defaults: BENTOML_DO_NOT_TRACK, SPO_TORCH_THREADS=1.
serve: $(STAMP)
	$(BIN)/spo-serve --host $(HOST) --port $(PORT)

# The pinned weights a GPU start needs (spo_runtime/model/weights.py), into HF_HOME, with their sizes;
# `make weights-plan` prints the plan without the network. WEIGHTS_ARGS: e.g. --train, --dir /srv/models.
WEIGHTS_ARGS ?=
weights: $(STAMP)
	$(BIN)/python -m spo_runtime download $(WEIGHTS_ARGS)

weights-plan: $(STAMP)
	$(BIN)/python -m spo_runtime download --dry-run $(WEIGHTS_ARGS)

# docs/configuration.md's variable and weights tables, generated from spo_runtime/settings.py and model/weights.py
docs: $(STAMP)
	$(BIN)/python docs/make_configuration.py

build: $(STAMP)
	BENTOML_DO_NOT_TRACK=true $(BIN)/bentoml build

# Two pytest-xdist workers (TEST_JOBS), one group per server configuration or module (tests/conftest.py), then
# the tests marked `serial` (a soak, a timed load test: they measure capacity) alone. Exit 5 is "nothing
# selected" (a PYTEST_ARGS -k that picks tests of one phase only).
TEST_JOBS ?= 2
test: $(DEV_STAMP) deps-system
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadgroup -m "not serial" --durations=15 $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m serial --durations=5 $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The unit tests alone: no `bentoml serve` (marker `server`) and none of the `slow` ones (training runs,
# subprocesses that import the whole stack); about a minute. `make test` runs these and the rest.
test-fast: $(DEV_STAMP) deps-system
	$(BIN)/python -m pytest -m "not server and not slow" --durations=10 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m spo_runtime generate "a watercolor fox in a snowy forest" --seed 42 -o demo.png

# Load test against a server that is already running (starts none): `make load URL=... USERS=... TIME=...`.
# The request mix is set with locust options in LOCUST_ARGS, e.g. LOCUST_ARGS="--steps 10,20 --batch-share 0.2";
# benchmarks/locustfile.py's docstring lists them. Reports: benchmarks/out/load*.
URL ?= http://127.0.0.1:3000
USERS ?= 8
SPAWN ?= 2
TIME ?= 60s
LOCUST_ARGS ?=

load: $(DEV_STAMP)
	mkdir -p benchmarks/out
	$(BIN)/locust -f benchmarks/locustfile.py -H $(URL) -u $(USERS) -r $(SPAWN) -t $(TIME) --headless \
		--csv benchmarks/out/load --html benchmarks/out/load.html $(LOCUST_ARGS)

# Wheels the GPU machine lacks (it has torch, transformers, peft, safetensors; not diffusers or pydantic),
# for Python 3.12 x86-64; our package itself travels as source (PYTHONPATH=.). torchao 0.18.0 (SPO_QUANT=fp8,
# one abi3 wheel for Python >= 3.10) imported and ran float8 on the GPU machine's torch 2.11 (PERF_NOTES).
GPU_WHEELS := diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.7.0 \
	typing-inspection==0.4.5 typing_extensions==4.16.0 importlib_metadata torchao==0.18.0
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache

# Debian tools the deployment tests use: kubectl (Debian's package is kubernetes-client) for
# tests/deploy/test_deploy.py, prometheus and promtool for tests/deploy/test_prometheus.py, chromium for
# tests/service/test_ui.py (Playwright, pinned in requirements-dev.txt, drives Debian's browser; Playwright's own
# browser download is not used). `make test` calls this target: it installs only what is missing, says so first
# (as root, or through sudo), and on a machine without apt-get it installs nothing and says which tests will skip
# (CI installs them and runs those tests).
SYSTEM_TOOLS := kubectl=kubernetes-client prometheus=prometheus promtool=prometheus chromium=chromium
.PHONY: deps-system prometheus-check
deps-system:
	@missing=$$(for t in $(SYSTEM_TOOLS); do command -v $${t%%=*} >/dev/null || echo $${t#*=}; done | sort -u | tr '\n' ' '); missing=$$(echo $$missing); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "deps-system: no apt-get here: not installing $$missing; tests/deploy/test_deploy.py, tests/deploy/test_prometheus.py and tests/service/test_ui.py will skip"; \
		exit 0; \
	fi; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	echo "deps-system: installing the Debian packages $$missing (for tests/deploy/test_deploy.py, tests/deploy/test_prometheus.py, tests/service/test_ui.py): $$sudo apt-get install $$missing"; \
	$$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing

# The Prometheus files alone (no server): promtool on the rules, their unit tests and the one-machine config.
prometheus-check: deps-system
	promtool check rules deploy/prometheus/rules.yml
	promtool check config deploy/prometheus/prometheus.yml
	promtool test rules deploy/prometheus/rules_test.yml

# Soak (starts its own server, tiny preset): an open-loop mix at 70% of the capacity it measures first, sampling
# the worker's RSS, fds, threads (and device memory) every 10 s; `make soak DURATION=30m`. Summary:
# benchmarks/results/soak_$(DURATION).json. Contention: the same schedule with and without two busy processes,
# per thread setting; `make contention`. Both take the machine for their duration: run them on a quiet one.
DURATION ?= 30m
soak: $(DEV_STAMP)
	$(BIN)/python benchmarks/soak.py --duration $(DURATION) --tag soak_$(DURATION)

contention: $(DEV_STAMP)
	$(BIN)/python benchmarks/contention.py --tag contention

.PHONY: soak contention

# The container (deploy/container/README.md): `make container` builds the bento and an OCI image with
# `bentoml containerize`: docker where `docker info` succeeds (python:3.11-slim, CUDA torch), else podman
# (a Debian-built base when no image registry answers; the CPU torch wheel). `make container-test` builds
# it if missing, runs it with the tiny preset and checks /readyz, the README's curl and a clean SIGTERM
# exit (minutes; not part of `make test`). Settings: CONTAINER_ENGINE, CONTAINER_TORCH, CONTAINER_BASE,
# CONTAINER_IMAGE (deploy/container/lib.sh).
container: $(STAMP)
	VENV=$(VENV) bash deploy/container/build.sh

container-test: $(STAMP)
	VENV=$(VENV) bash deploy/container/test.sh

.PHONY: container container-test
