#!/usr/bin/env bash
# The GPU training figures of experiments/benchmarks/README.md in one command, within a fixed wall-clock budget (a
# lent GPU machine is held for minutes): each part has its own time limit, cut to what is left of BUDGET, so one
# slow compile cannot eat the rest, and a part that would start with under 20 s left is skipped.
#
#   OUT=/tmp/gpu bash experiments/benchmarks/gpu_checks.sh        # on a GPU machine: at most BUDGET=480 s (8 min)
#   bash experiments/benchmarks/gpu_checks.sh --dry-run            # (or DRY_RUN=1) every part on the CPU, tiny model
#
# Needs the project importable (pip install -e . or PYTHONPATH=<repo>); PYTHON picks the interpreter (python3).
# Training, ddpm_cifar10's U-Net (35.7M, 37.3 GFLOP per training image) on synthetic data of its shape, bf16-mixed,
# batch 128 and 256 per GPU: eager, compile default, compile default + channels_last, compile reduce-overhead (CUDA
# graphs); each line gives images/s, TFLOP/s and MFU against the device's dense bf16 peak (sample_throughput.py's
# table: H100 SXM / H200 989.4 TFLOP/s), and the host syncs found in 3 steady-state steps after the timed ones
# (torch.cuda.set_sync_debug_mode; "none" is the goal). Then GroupNorm + conv in NCHW vs channels-last with torch's
# and the layout-free norm, and, with 2+ GPUs, 2-GPU DDP (eager and compile default, batch 256 per GPU). JSON lines
# of every training row: $OUT/train.jsonl. SAMPLING=1 adds the sampling throughput parts (~3.5 min more).
#
# The dry run (tests/integration/test_gpu_checks.py runs it): the same parts on the CPU with a tiny U-Net
# (ch 32, one level, 8x8), batch 4, 2 warm-up + 2 timed steps + 2 checked, torch.compile through aot_eager
# (inductor's C++ compile takes minutes on a small CPU), a stand-in peak of 1 TFLOP/s so the MFU path runs, and
# DDP as 2 CPU processes (gloo); no time budget (PART_LIMIT per part). It checks that every code path runs and
# finds no host sync, not any number.
set -u
DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        *) echo "unknown argument: $arg (use --dry-run, or the environment: OUT, BUDGET, STEPS, WARMUP, SAMPLING)"; exit 2 ;;
    esac
done
OUT=${OUT:-gpu_checks}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")" && pwd)

if [ "$DRY_RUN" = 1 ]; then
    BUDGET=${BUDGET:-3600}  # the dry run checks code paths, not time: every part runs, each under PART_LIMIT
    PART_LIMIT=${PART_LIMIT:-600}
    NGPU=0
    BATCHES="4"
    STEPS=${STEPS:-2}; WARMUP=${WARMUP:-2}
    TRAIN=(--accelerator cpu --compile-backend aot_eager --peak-tflops 1 --sync-check 2
           model.net.ch=32 "model.net.ch_mult=[1]" model.net.num_res_blocks=1 "model.net.attn_resolutions=[8]"
           data.image_size=8)
    DDP=(trainer=ddp trainer.devices=2)
    NORM=(--device cpu --batch 2 --shapes 64x8 --iters 2)
    echo "dry run: every part on the CPU with a tiny U-Net (no figure here means anything)" | tee "$OUT/device.txt"
else
    BUDGET=${BUDGET:-480}
    NGPU=$($PYTHON -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "$NGPU" -lt 1 ]; then
        echo "no CUDA GPU here: nothing to measure (bash $0 --dry-run checks the script on the CPU)"; exit 1
    fi
    BATCHES="128 256"
    STEPS=${STEPS:-50}; WARMUP=${WARMUP:-10}
    TRAIN=(--sync-check 3)
    DDP=(trainer=ddp trainer.devices=2)
    NORM=()
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
fi
$PYTHON -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', torch.cuda.device_count(), 'GPUs')" \
    2>&1 | tee -a "$OUT/device.txt"

part() {  # part NAME SECONDS COMMAND...: run with a time limit (cut to the budget left), keep its output
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped (${left} s of the ${BUDGET} s budget left)" | tee "$OUT/$name.txt"
        return
    fi
    [ "$DRY_RUN" = 1 ] && limit=$PART_LIMIT
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -e "^💡" -e "litlogger" | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - start)) s"
    [ "$status" = 0 ] || FAILED="$FAILED $name"
}
FAILED=""

train() {  # train NAME SECONDS SETTING [EXTRA...]: one setting of ddpm_cifar10 at every batch size
    local name=$1 limit=$2 setting=$3; shift 3
    part "$name" "$limit" "$PYTHON" "$here/train_throughput.py" --experiment ddpm_cifar10 --precisions bf16-mixed \
        --settings "$setting" --batch-sizes $BATCHES --warmup "$WARMUP" --steps "$STEPS" --no-plain-loop \
        --out "$OUT/train.jsonl" "${TRAIN[@]}" "$@"
}

rm -f "$OUT/train.jsonl"
train train_eager 60 eager
train train_compile 115 default
train train_compile_channels_last 105 default+channels_last
train train_reduce_overhead 105 reduce-overhead
part group_norm 25 "$PYTHON" "$here/group_norm_layout.py" ${NORM[@]+"${NORM[@]}"}
if [ "$DRY_RUN" = 1 ] || [ "$NGPU" -ge 2 ]; then
    # the last 60 s of the budget: eager always, compile default if the machine still has time (cached kernels)
    train train_ddp2 60 eager "${DDP[@]}"
    train train_ddp2_compile 60 default "${DDP[@]}"
fi
if [ "${SAMPLING:-0}" = 1 ]; then
    BUDGET=$((SECONDS + 220))
    part sample_eager 80 "$PYTHON" "$here/sample_throughput.py" --experiment ddpm_cifar10 --batch-size 256 --tf32 \
        --precisions 32 bf16-mixed --steps 10 --rounds 3 --out "$OUT/sample_eager.json"
    part sample_compile 130 "$PYTHON" "$here/sample_throughput.py" --experiment ddpm_cifar10 --batch-size 256 \
        --tf32 --precisions bf16-mixed --compile --steps 10 --rounds 3 --out "$OUT/sample_compile.json"
fi

echo "=== summary ($SECONDS s): training images/s and MFU per setting"
$PYTHON - "$OUT/train.jsonl" <<'EOF'
import json, sys
from pathlib import Path

path = Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
for r in rows:
    mfu = f"{100 * r['mfu']:5.1f}% MFU" if r["mfu"] is not None else "MFU n/a"
    syncs = r.get("host_syncs")
    print(f"{r['setting']:44s} x{r['world_size']} batch {r['batch_size']:4d}  {r['lightning']:10.1f} images/s  "
          f"{r['tflops_per_device']:8.3g} TFLOP/s/device  {mfu}  host syncs: "
          f"{'not checked' if syncs is None else len(syncs)}")
print(f"{len(rows)} rows; {rows[0]['flops_per_image'] / 1e9:.2f} GFLOP per training image, peak "
      f"{rows[0]['peak_tflops']} TFLOP/s on {rows[0]['device']}" if rows else "no training rows")
EOF
if [ -n "$FAILED" ]; then
    echo "parts that failed or ran out of time:$FAILED"
    exit 1
fi
