#!/usr/bin/env bash
# One GPU check, run from the repository root on a CUDA machine without internet (e.g. the lent H200).
# Measures, with ViT-L-14-336 (random weights) at 518 px, batch 8 (goal: predict at most 20 ms/image in bf16 on
# an H200):
#   bf16 ms/image of predict (SDPA attention: flash / memory-efficient kernels) and of the backbone alone, their
#   ratio, text encoder 13 vs 77 tokens, bf16 vs fp32 output difference; the GPU-marked tests (precision, SDPA
#   vs open_clip's attention on CUDA); bf16 through open_clip's MHA blocks (what SDPA gains on the GPU); peak
#   CUDA memory; fp32 speed; then (if time is left) torch.compile.
# Results go to $OUT/gpu_results.md (default /tmp/vip2clip_gpu) and are printed at the end.
# Needs torch with CUDA; installs open_clip from wheels in .whl/ when it is missing:
#   open_clip_torch-3.3.0-py3-none-any.whl, ftfy-6.3.1-py3-none-any.whl, wcwidth-0.9.4-*.whl
# (its other needs, torchvision timm huggingface_hub safetensors regex tqdm, are assumed present).
# The whole script stops within BUDGET_S seconds (default 280). A dry run without a GPU:
#   DEVICE=cpu BACKBONE=tiny SIZE=512 BUDGET_S=120 bash benchmarks/gpu_check.sh   (518 is no multiple of tiny's patch)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vip2clip_gpu}"
mkdir -p "$OUT"
RESULTS="$OUT/gpu_results.md"
DEADLINE=$((SECONDS + ${BUDGET_S:-280}))
export PYTHONUNBUFFERED=1

python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if ! python3 -c 'import open_clip' 2>/dev/null; then
    echo "open_clip missing: installing from .whl/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vip2clip_site .whl/*.whl \
        || { echo "cannot install the wheels in .whl/"; exit 1; }
    export PYTHONPATH="/tmp/vip2clip_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import open_clip, vip2clip; print("open_clip", open_clip.__version__, "vip2clip", vip2clip.__file__)' || exit 1

# step SECONDS_WANTED COMMAND...: runs COMMAND under a timeout that never passes the overall deadline.
step() {
    local want=$1
    shift
    local left=$((DEADLINE - SECONDS))
    if ((left < 20)); then
        echo "SKIPPED (time budget spent): $*" | tee -a "$RESULTS"
        return 0
    fi
    ((want > left)) && want=$left
    echo "=== $* (limit ${want}s)"
    timeout "$want" "$@" || echo "FAILED or timed out (rc $?): $*" | tee -a "$RESULTS"
}

DEVICE="${DEVICE:-cuda}"
BACKBONE="${BACKBONE:-ViT-L-14-336}"
SIZE="${SIZE:-518}"
COMMON=(--device "$DEVICE" --backbone "$BACKBONE" --sizes "$SIZE" --batches 8 --output "$RESULTS")
step 120 python3 benchmarks/bench_inference.py "${COMMON[@]}" --precision bf16 --repeats 20 --warmup 3
step 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/model/test_precision.py tests/model/test_sdpa.py
step 90 python3 benchmarks/bench_inference.py "${COMMON[@]}" --precision bf16 --repeats 10 --warmup 3 --attention mha
step 60 python3 benchmarks/bench_memory.py --device "$DEVICE" --backbone "$BACKBONE" --size "$SIZE" --precision bf16 --output "$RESULTS"
step 60 python3 benchmarks/bench_inference.py "${COMMON[@]}" --precision fp32 --repeats 10 --warmup 2
step 150 python3 benchmarks/bench_inference.py "${COMMON[@]}" --precision bf16 --repeats 20 --warmup 3 --compile

echo
echo "================ $RESULTS"
cat "$RESULTS"
