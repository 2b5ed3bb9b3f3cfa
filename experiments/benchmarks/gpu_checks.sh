#!/usr/bin/env bash
# The GPU figures of experiments/benchmarks/README.md in one command (a lent GPU machine is held for minutes,
# so everything runs in one go, each part under its own time limit so one slow compile cannot eat the rest).
#
#   OUT=/tmp/gpu bash experiments/benchmarks/gpu_checks.sh
#
# Needs the project importable (pip install -e . or PYTHONPATH=<repo>) and a CUDA GPU. Writes each part's output
# and JSON records under $OUT. Training: ddpm_cifar10's U-Net (35.7M), batch 128, synthetic data of its shape,
# 32-true (TF32 matmuls/convs) vs bf16-mixed vs channels_last, then bf16-mixed + torch.compile; each with the
# plain-loop comparison except the compiled one. Sampling: the same U-Net at batch 256, 32 (TF32) / bf16-mixed,
# then bf16-mixed + compile, with the fraction of the device's peak.
set -u
OUT=${OUT:-gpu_checks}
STEPS=${STEPS:-100}
WARMUP=${WARMUP:-20}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")" && pwd)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tee -a "$OUT/device.txt"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its output
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

part train_eager 150 python3 "$here/train_throughput.py" --experiment ddpm_cifar10 --batch-size 128 \
    --precisions 32-true bf16-mixed --channels-last --warmup "$WARMUP" --steps "$STEPS"
part sample_eager 80 python3 "$here/sample_throughput.py" --experiment ddpm_cifar10 --batch-size 256 --tf32 \
    --precisions 32 bf16-mixed --steps 10 --rounds 3 --out "$OUT/sample_eager.json"
part train_compile 180 python3 "$here/train_throughput.py" --experiment ddpm_cifar10 --batch-size 128 \
    --precisions bf16-mixed --compile --no-plain-loop --warmup "$WARMUP" --steps "$STEPS"
part sample_compile 130 python3 "$here/sample_throughput.py" --experiment ddpm_cifar10 --batch-size 256 --tf32 \
    --precisions bf16-mixed --compile --steps 10 --rounds 3 --out "$OUT/sample_compile.json"
