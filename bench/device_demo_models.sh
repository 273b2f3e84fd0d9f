#!/usr/bin/env bash
# Train the demo models with `python -m capfilt.recipes.demo --gpu` on a lent GPU machine and bring back the
# models and the training logs. Run from the repository root:
#
#   bash bench/device_demo_models.sh OUT_DIR [extra python -m capfilt.recipes.demo flags]
#   AB="--vision-position-init random" bash bench/device_demo_models.sh OUT_DIR [flags]
#   bash bench/device_demo_models.sh OUT_DIR --continue-from capfilt/demo_models --finetune-lr 1e-4
#
# With AB set, a second run (the same flags, then AB's) trains side by side with the first on the same
# rendered splits, and its results go to OUT_DIR/b/. Each gets half of the 14 loader processes. Measured at
# batch 256 on an H100 (docs/research-log.md): side by side, each run pre-trained at ~710 samples/s (one step alone,
# batch already on the GPU: 2,046) and fine-tuned its captioner at ~3,000 and its filter at ~1,600 samples/s,
# so an A/B costs each run half its pre-training; use it to compare, and a single run to make models.
# That machine has python3 with a CUDA torch and no internet: capfilt is put on PYTHONPATH as it is laid
# out when installed (models/ and pipelines/ inside capfilt/), and transformers is taken from wheels in
# .whl/ when there are any (the version this repository is tested with). OUT_DIR receives:
#   models.tar.gz (captioner/ and filter/, as `make demo-models` installs them), logs.tar.gz (each
#   stage's log.jsonl), console.log, env.txt, and loader.md (bench/bench_loader.py) and attention.md
#   (bench/bench_attention.py) if time is left.
# It ends within about DEADLINE seconds (default 540, under the lent machine's 600 s per command).
set -uo pipefail
OUT=${1:?usage: bench/device_demo_models.sh OUT_DIR [flags]}
shift
START=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SITE=/tmp/capfilt-site
WORK=/tmp/capfilt-demo
rm -rf "$SITE" "$WORK" "$WORK-b" && mkdir -p "$SITE/capfilt" "$WORK" "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || exit 1
fi
cp -r capfilt/. "$SITE/capfilt/" && cp -r models "$SITE/capfilt/models" && cp -r pipelines "$SITE/capfilt/pipelines"
export PYTHONPATH=$SITE
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    python3 -c "import sys, torch, transformers, pyarrow, PIL; print(sys.version.split()[0], torch.__version__, \
torch.cuda.is_available(), transformers.__version__, pyarrow.__version__, PIL.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The splits first; then the training stages share what is left of DEADLINE seconds, keeping OVERHEAD seconds
# for starting processes, exporting and installing. capfilt.recipes.demo deals the budget out (split_budget: 45%
# pre-training, 55% fine-tuning; all of it to the fine-tunes of a run that goes on from installed models).
DEADLINE=${DEADLINE:-540}
OVERHEAD=${OVERHEAD:-80}
python3 -P -m capfilt.recipes.demo --gpu --splits-only --work "$WORK" "$@" 2>&1 | tee "$OUT/console.log"
TRAIN=$((DEADLINE - OVERHEAD - ($(date +%s) - START)))
echo "[device] $TRAIN s for training" | tee -a "$OUT/console.log"
# One training run: WORK_DIR, OUT_DIR, then its flags. Its own work folder links the shared splits.
train() {
    local work=$1 out=$2
    shift 2
    mkdir -p "$work/data" "$out"
    [ "$work" = "$WORK" ] || ln -sfn "$WORK/data/human" "$work/data/human"
    [ "$work" = "$WORK" ] || ln -sfn "$WORK/data/web" "$work/data/web"
    python3 -P -m capfilt.recipes.demo --gpu --work "$work" --install "$work/install" --train-seconds "$TRAIN" "$@" 2>&1 \
        | grep --line-buffered -v "Loading weights\|Writing model shards" | tee -a "$out/console.log"
    local status=${PIPESTATUS[0]}
    echo "[device] capfilt.recipes.demo exited with $status after $(($(date +%s) - START)) s" | tee -a "$out/console.log"
    tar -czf "$out/logs.tar.gz" -C "$work" --ignore-failed-read pretrain/log.jsonl captioner/log.jsonl \
        filter/log.jsonl
    if [ -d "$work/install/filter" ]; then
        tar -czf "$out/models.tar.gz" -C "$work/install" captioner filter
    fi
    return "$status"
}

if [ -n "${AB:-}" ]; then
    # Two runs side by side: 7 loader processes each (the fine-tunes of each run split them again).
    train "$WORK" "$OUT" "$@" --loader-workers 7 &
    first=$!
    # shellcheck disable=SC2086  # AB holds several flags
    train "$WORK-b" "$OUT/b" "$@" --loader-workers 7 $AB
    second=$?
    wait "$first"
    first=$?
    status=$((first > second ? first : second))
else
    train "$WORK" "$OUT" "$@"
    status=$?
fi
if [ -d "$WORK/data/human" ] && [ $(($(date +%s) - START)) -lt $((DEADLINE - 40)) ]; then
    timeout 45 python3 bench/bench_loader.py --data "$WORK/data/human" --workers 1 14 --batch 64 --batches 100 \
        --streams 16 2>&1 | tee "$OUT/loader.md"
fi
if [ $(($(date +%s) - START)) -lt $((DEADLINE - 30)) ]; then
    timeout 25 python3 bench/bench_attention.py --device cuda --dtype bfloat16 --preset large --batch 32 \
        2>&1 | tee "$OUT/attention.md"
fi
echo "[device] done after $(($(date +%s) - START)) s"
exit "$status"
