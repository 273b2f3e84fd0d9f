# capfilt — every target runs offline (HF_HUB_OFFLINE=1): nothing is downloaded at run time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this machine's disk; on a GPU cluster pass TORCH="torch==<ver>" for a CUDA build.
TORCH ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow clean

install: $(VENV)/.installed  ## set up everything from a fresh clone

# The dask extra too: `make bootstrap RUNNER=DaskRunner` works from a fresh clone, and tests/test_dask.py runs.
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,dask]"
	touch $@

test: install  ## run the test suite (CPU, offline) but for the slow set
	$(PY) -m pytest -q -m "not slow" tests

test-slow: install  ## the slow set apart: whole recipes, the Dask cluster, multi-process training
	$(PY) -m pytest -q -m slow tests

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

# BLIP-2's data recipe (BLIP-2 paper §3.4): BLIP-large writes 10 nucleus captions per image, CLIP ViT-L/14 ranks
# them with the web text by image-text similarity, and each image keeps its top two texts; no threshold.
BLIP2_RECIPE = --captioner Salesforce/blip-image-captioning-large --filter openai/clip-vit-large-patch14 \
  -k 10 --method nucleus --by itc --select top-2

.PHONY: bootstrap bootstrap-blip2-recipe bench-pipeline bench-throughput

bootstrap: install  ## CapFilt: DATA=demo|cc12m|cc3m|sbu|laion400m|PATH OUT=... CAPTIONER=... FILTER=... RUNNER=... ARGS="..."
	$(VENV)/bin/capfilt bootstrap --data "$(DATA)" --out "$(OUT)" --runner "$(RUNNER)" \
	  $(if $(CAPTIONER),--captioner "$(CAPTIONER)") $(if $(FILTER),--filter "$(FILTER)") $(ARGS)

bootstrap-blip2-recipe: install  ## BLIP-2's recipe: BLIP-large, -k 10 nucleus, CLIP ViT-L/14 keeps each image's top two texts (DATA=... OUT=...; docs/models.md)
	$(VENV)/bin/capfilt bootstrap --data "$(DATA)" --out "$(OUT)" --runner "$(RUNNER)" $(BLIP2_RECIPE) $(ARGS)

# Look at OUT's report as a browser draws it: headless Chromium (not in setup.py; Debian: apt-get install chromium).
CHROMIUM ?= chromium
SCREENSHOT ?= $(OUT)/report.png

.PHONY: report-screenshot

report-screenshot:  ## a headless Chromium screenshot of OUT's report.html into SCREENSHOT (default OUT/report.png; CHROMIUM=...)
	@test -f "$(OUT)/report.html" || { echo "no $(OUT)/report.html: run make bootstrap OUT=$(OUT) first" >&2; exit 2; }
	HOME="$${TMPDIR:-/tmp}" $(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars \
	  --window-size=1200,2800 --screenshot="$(abspath $(SCREENSHOT))" "file://$(abspath $(OUT))/report.html" 2>/dev/null
	@echo "$(SCREENSHOT)"

bench-pipeline: install  ## images/s of the CapFilt pipeline on tiny models (this CPU)
	nice $(PY) bench/bench_pipeline.py $(ARGS)

bench-throughput: install  ## images/s of plain transformers, capfilt's engine and its pipeline on BLIP-size models (docs/throughput.md; ARGS="--config base large")
	$(PY) bench/bench_throughput.py $(ARGS)

# --- the loop in miniature ---------------------------------------------------------------
# make demo-loop: round 1 (the shipped demo models) -> pre-train on human + kept -> fine-tune a captioner and a
# filter on human -> round 2 with them; prints round 1 vs round 2 (capfilt.recipes.loop_report). docs/training.md,
# "make demo-loop". Its folders are its own: out/bootstrap and runs/ are left alone. Every stage starts afresh.
LOOP_OUT ?= out/demo-loop
LOOP_RUNS ?= runs/demo-loop
LOOP_HUMAN ?= 2000
LOOP_PRETRAIN_STEPS ?= 200
LOOP_CAPTIONER_STEPS ?= 300
LOOP_FILTER_STEPS ?= 200
LOOP_TRAIN = --model demo --epochs 1000 --log-every 25 --workers 2 --no-resume
CAPFILT := $(VENV)/bin/capfilt

.PHONY: demo-loop

demo-loop: install  ## the paper's loop in miniature on the demo: round 1, pre-train, fine-tune captioner and filter, round 2, table (5 min on 2 cores alone, 17 beside other jobs; LOOP_*_STEPS=..., docs/training.md)
	rm -rf "$(LOOP_OUT)" "$(LOOP_RUNS)"
	$(CAPFILT) bootstrap --data demo --out "$(LOOP_OUT)/round1" --runner "$(RUNNER)"
	$(CAPFILT) shapes write --split human --n $(LOOP_HUMAN) --seed 1 --out "$(LOOP_OUT)/human"
	$(CAPFILT) train pretrain $(LOOP_TRAIN) --data "$(LOOP_OUT)/human" "$(LOOP_OUT)/round1/kept" \
	  --out "$(LOOP_RUNS)/pretrain" --max-steps $(LOOP_PRETRAIN_STEPS) --checkpoint-every 100000
	$(CAPFILT) train finetune-captioner $(LOOP_TRAIN) --init "$(LOOP_RUNS)/pretrain" --data "$(LOOP_OUT)/human" \
	  --out "$(LOOP_RUNS)/captioner" --max-steps $(LOOP_CAPTIONER_STEPS) --checkpoint-every 0
	$(CAPFILT) train finetune-filter $(LOOP_TRAIN) --init "$(LOOP_RUNS)/pretrain" --data "$(LOOP_OUT)/human" \
	  --out "$(LOOP_RUNS)/filter" --max-steps $(LOOP_FILTER_STEPS) --checkpoint-every 0
	$(CAPFILT) bootstrap --data demo --out "$(LOOP_OUT)/round2" --runner "$(RUNNER)" \
	  --captioner "$(LOOP_RUNS)/captioner/captioner" --filter "$(LOOP_RUNS)/filter/filter"
	$(PY) -m capfilt.recipes.loop_report "$(LOOP_OUT)/round1" "$(LOOP_OUT)/round2"

# --- the shapes-world demo models ---------------------------------------------------------
.PHONY: demo-models evaluate-demo experiment

demo-models: install  ## train the demo captioner and filter into capfilt/demo_models (about 1 h 30 min on 2 cores; resumable; ARGS=--gpu: ~8 min on one GPU; ARGS="--continue-from DIR": go on fine-tuning installed models; docs/demo.md)
	$(VENV)/bin/capfilt demo-models $(ARGS)

evaluate-demo: install  ## the demo models on a fresh web split: removal per kind and scene type, caption correctness and errors, relation probe (ARGS="--rendering changed": the same scenes drawn by a second renderer)
	$(VENV)/bin/capfilt evaluate --captioner demo --filter demo $(ARGS)

experiment: install  ## the bootstrapping experiment: pre-training on raw web, ITM- and ITC-filtered web texts and CapFilt web, scored on test (docs/experiment.md; 1 h 15 min on 2 cores after demo-models before the two baselines, which add a pre-training each; resumable)
	$(VENV)/bin/capfilt experiment $(ARGS)
