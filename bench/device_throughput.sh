#!/usr/bin/env bash
# CapFilt throughput on a lent GPU machine: bench/bench_throughput.py for BLIP base and large, then BLIP-2 and CLIP (random
# weights, bf16 autocast), the plain transformers loop, capfilt's engine and the pipeline side by side, with
# the model FLOPs utilisation against the card's bf16 peak. One command, well under 8 minutes. From the
# repository root:
#
#   bash bench/device_throughput.sh OUT_DIR [extra bench_throughput.py flags]
#
# That machine has python3 with a CUDA torch and transformers but no apache-beam and no internet. capfilt is
# put on PYTHONPATH as it is laid out when installed (models/ and pipelines/ inside capfilt/); wheels in .whl/
# are installed first when there are any: transformers of the version tested here, and apache-beam with the
# packages it needs, which the pipeline way (c) imports; without beam only (a) and (b) run, and the table
# says so with a dash. OUT_DIR receives env.txt, throughput.json and throughput.md (the table for the README).
set -uo pipefail
OUT=${1:?usage: bench/device_throughput.sh OUT_DIR [flags]}
shift
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SITE=/tmp/capfilt-site
rm -rf "$SITE" && mkdir -p "$SITE/capfilt" "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || exit 1
fi
cp -r capfilt/. "$SITE/capfilt/" && cp -r models "$SITE/capfilt/models" && cp -r pipelines "$SITE/capfilt/pipelines"
export PYTHONPATH=$SITE
{
    date -u +%Y-%m-%dT%H:%MZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, \
torch.cuda.is_available(), transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

WAYS="plain engine pipeline"
python3 -c "import apache_beam" 2>/dev/null || { WAYS="plain engine"; echo "[device] no apache-beam: ways $WAYS"; }
# 512 images in batches of 64: each way runs a warm-up and 2 timed rounds; large's plain loop is the slowest
# part (about 10 s a round at 100 images/s). Captions are 20 tokens, prompt included, as on CPU.
# shellcheck disable=SC2086
timeout 400 python3 -P bench/bench_throughput.py --config base large --device cuda --images 512 --batch-size 64 \
    --ways $WAYS --json "$OUT/throughput.json" "$@" 2>&1 | tee "$OUT/throughput.log"
grep -A20 '^device:' "$OUT/throughput.log" >"$OUT/throughput.md" || true
# BLIP-2 (OPT) captioner and CLIP ranker rows, random weights of the sizes in FAMILY_SIZES: plain transformers
# against capfilt's engine; captions of 20 new tokens.
# shellcheck disable=SC2086
timeout 110 python3 -P bench/bench_throughput.py --config blip2-small clip-small --device cuda --images 256 \
    --batch-size 64 --ways plain engine --json "$OUT/throughput_families.json" "$@" 2>&1 \
    | tee "$OUT/throughput_families.log"
grep -A20 '^device:' "$OUT/throughput_families.log" >>"$OUT/throughput.md" || true
cat "$OUT/throughput.md"
