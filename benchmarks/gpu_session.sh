#!/usr/bin/env bash
# Everything that needs a lent GPU, in one call that fits a 10-minute limit:
#   1. benchmarks/speed.py on CUDA (128^3, batch 2, bf16, eager and torch.compile)      -> speed_cuda.json
#   2. `ciml train` on CUDA: bf16 autocast + cudnn.benchmark + TensorBoard               -> train_bf16/
#   3. the same under `torchrun --nproc_per_node=1` (DDP on the NCCL backend)            -> train_ddp/
#   4. the same with --compile                                                          -> train_compile/
# Each step has its own time limit, so a slow one cannot cost the others their results. $OUT gets
# steps.txt, speed_cuda.json and one archive, logs.tar.gz, of the logs, run metrics, progress.png and
# TensorBoard events (few files: the device tool returns only a handful; checkpoints stay behind).
#
# Usage, from the repository root on the GPU machine (brain phantom made beforehand, anywhere):
#     ciml phantom brats --out gpu_data --cases 10 --spacing 2      # on any machine
#     OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh gpu_data
# Dry run of the script itself on a CPU: DEVICE=cpu QUICK=1 OUT=/tmp/dry bash benchmarks/gpu_session.sh gpu_data
set -u
DATA=${1:?usage: gpu_session.sh PHANTOM_DIR}
OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
RUNS=$(mktemp -d)
LOGS="$RUNS/logs"
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

if [ "${QUICK:-0}" = 1 ]; then
    SPEED=(--quick --device "$DEVICE")
    TRAIN_SIZE=(--patch 32 32 32 --widths 4 8 16 --iterations 4 --validate-every 4)
    LIMITS=(120 120 120 30)
else
    # measured on an H200: eager rows ~80 s, compiled joint ~30 s, compiled CIML's first step ~110 s
    SPEED=(--device "$DEVICE" --compile --no-compiled-inference)
    TRAIN_SIZE=(--patch 64 64 64 --iterations 40 --validate-every 40)
    LIMITS=(260 60 60 180)
fi
TRAIN=(-m ciml.cli train --task brats2020 --data "$DATA" --device "$DEVICE" --batch-size 2
       --max-validation-cases 2 --no-progress "${TRAIN_SIZE[@]}")

{
    date -u +%FT%TZ
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PY" -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"
} > "$LOGS/environment.txt" 2>&1

step() {  # step NAME LIMIT COMMAND...: run with a time limit, log its output and exit status
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - started)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
}

archive() {  # everything under $LOGS as one file in $OUT
    tar czf "$OUT/logs.tar.gz" -C "$RUNS" logs
}

keep_logs() {  # keep_logs RUN: the run's small files (no checkpoints, no preprocessed data), archived
    mkdir -p "$LOGS/$1"
    if [ -d "$RUNS/$1" ]; then
        (cd "$RUNS/$1" && find . -path ./preprocessed -prune -o -type f ! -name '*.pt' -size -5M \
            -exec cp --parents {} "$LOGS/$1" \;)
    fi
    archive
}

step speed "${LIMITS[0]}" "$PY" benchmarks/speed.py "${SPEED[@]}" --out "$OUT/speed_$DEVICE.json" --overwrite
archive
step train_bf16 "${LIMITS[1]}" "$PY" "${TRAIN[@]}" --out "$RUNS/train_bf16" --tensorboard
keep_logs train_bf16
step train_ddp "${LIMITS[2]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "${TRAIN[@]}" \
    --out "$RUNS/train_ddp"
keep_logs train_ddp
step train_compile "${LIMITS[3]}" "$PY" "${TRAIN[@]}" --out "$RUNS/train_compile" --compile
keep_logs train_compile
rm -rf "$RUNS"
cat "$OUT/steps.txt"
