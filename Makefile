# capfilt — every target runs offline (HF_HUB_OFFLINE=1): nothing is downloaded at run time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this machine's disk; on a GPU cluster pass TORCH="torch==<ver>" for a CUDA build.
TORCH ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test clean

install: $(VENV)/.installed  ## set up everything from a fresh clone

# The dask extra too: `make bootstrap RUNNER=DaskRunner` works from a fresh clone, and tests/test_dask.py runs.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,dask]"
	touch $@

test: install  ## run the test suite (CPU, offline)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# --- CapFilt ------------------------------------------------------------------------------
# make bootstrap                       the offline demo (shapes world, shipped demo models)
# make bootstrap DATA=cc12m OUT=...    a named dataset or a path (URL list, img2dataset shards)
DATA ?= demo
OUT ?= out/bootstrap
RUNNER ?= FnApiRunner
CAPTIONER ?=
FILTER ?=
ARGS ?=

.PHONY: bootstrap bench-pipeline bench-throughput

bootstrap: install  ## CapFilt: DATA=demo|cc12m|cc3m|sbu|laion400m|PATH OUT=... CAPTIONER=... FILTER=... RUNNER=... ARGS="..."
	$(VENV)/bin/capfilt bootstrap --data "$(DATA)" --out "$(OUT)" --runner "$(RUNNER)" \
	  $(if $(CAPTIONER),--captioner "$(CAPTIONER)") $(if $(FILTER),--filter "$(FILTER)") $(ARGS)

bench-pipeline: install  ## images/s of the CapFilt pipeline on tiny models (this CPU)
	nice $(PY) bench/bench_pipeline.py $(ARGS)

bench-throughput: install  ## images/s of plain transformers, capfilt's engine and its pipeline on BLIP-size models (docs/throughput.md; ARGS="--config base large")
	$(PY) bench/bench_throughput.py $(ARGS)

# --- the shapes-world demo models ---------------------------------------------------------
.PHONY: demo-models evaluate-demo experiment

demo-models: install  ## train the demo captioner and filter into capfilt/demo_models (about 1 h 30 min on 2 cores; resumable; ARGS=--gpu: ~8 min on one GPU; ARGS="--continue-from DIR": go on fine-tuning installed models; docs/demo.md)
	$(VENV)/bin/capfilt demo-models $(ARGS)

evaluate-demo: install  ## the demo models on a fresh web split: removal per kind and scene type, caption correctness and errors, relation probe
	$(VENV)/bin/capfilt evaluate --captioner demo --filter demo $(ARGS)

experiment: install  ## the bootstrapping experiment: pre-training on raw vs CapFilt web, scored on test (docs/experiment.md; about 1 h 15 min on 2 cores after demo-models; resumable)
	$(VENV)/bin/capfilt experiment $(ARGS)
