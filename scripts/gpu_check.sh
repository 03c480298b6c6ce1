#!/usr/bin/env bash
# GPU check, about 6 minutes on one H200, most telling first: the CUDA-only tests, the benchmark on the
# GPU (paired mode, one folder per workload), 1-GPU fits of the examples (fp32 with data on the GPU,
# bf16 from pinned memory, torch.compile, predict, FSDP), 2-process NCCL runs (DDP, FSDP) when 2+ GPUs
# exist, peak memory per rank DDP vs FSDP (vs CPU offload), and the
# loop-semantics tests with CUDA as the default device. Each step has a time limit; a failed step is
# named at the end and the script goes on to the next.
#
#     bash scripts/gpu_check.sh                    # from the repository root, on a machine with CUDA
#     GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # dry run of the script itself, without a GPU
#
# Logs, the benchmark's JSON and PNG go to $OUT (default gpu_check_out); runs to a temporary folder.
# Uses the installed trainval, or this checkout's src/ when trainval is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}
OUT=${OUT:-gpu_check_out}
REPEATS=${GPU_CHECK_REPEATS:-5}
WORK=$(mktemp -d)
mkdir -p "$OUT"
$PY -c 'import trainval' 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0
failed=()
step() { echo; echo "=== $* ($(date +%T))"; }
check() {  # check NAME SECONDS COMMAND...: run with a time limit, remember a failure, go on
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then status=1; failed+=("$name (exit $rc)"); echo "--- $name FAILED (exit $rc)"; fi
}

step "environment"
$PY - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i))
PY
nvidia-smi -L 2>/dev/null || true

step "CUDA-only tests: zero syncs per step (and its control), pinned/on-device data, bf16, compile"
check cuda-tests 200 $PY -m pytest -q -p no:cacheprovider tests/test_performance_paths.py

# one process per workload (a slow one cannot take the other's table with it), one epoch per sample
# (3 tiny epochs of 6 contenders, 5 times, would take 6 minutes on one H200)
for workload in tiny mlp; do
  step "benchmark on the GPU: $workload, paired mode ($REPEATS repeats)"
  check "bench-$workload" 200 env TRAINVAL_BENCH_DEVICE=$DEV $PY benchmarks/compare.py --paired --repeats "$REPEATS" \
      --epochs 1 --workloads $workload --contenders hand,trainval,trainval_bar,notes,lightning_off,accelerate --out "$OUT/bench_$workload"
done

step "1-GPU fits of the examples"
T="train.device=$DEV train.progress=false run.out_dir=$WORK/runs run.overwrite=true"
$PY examples/make_phoneme_data.py --out "$WORK/data" --train 20000 --test 4000 >/dev/null
P="data.train=$WORK/data/phoneme_train.npz data.test=$WORK/data/phoneme_test.npz"
check fit-digits 60 $PY -m trainval fit examples/digits.yaml $T data.on_device=true
check fit-phoneme-bf16-pinned 60 $PY -m trainval fit examples/phoneme_mlp.yaml $P $T run.name=bf16 \
    train.precision=bf16 data.on_device=false
check fit-phoneme-compile 150 $PY -m trainval fit examples/phoneme_mlp.yaml $P $T run.name=compiled \
    train.compile=true train.epochs=2
check predict-compiled 60 $PY -m trainval predict "$WORK/runs/compiled/config.yaml" --out "$WORK/pred.csv"
head -3 "$WORK/pred.csv" 2>/dev/null

step "1-GPU FSDP fit (a one-member group; best.pt reloaded by test) and predict"
check fit-digits-fsdp 90 $PY -m trainval fit examples/digits.yaml $T run.name=fsdp train.strategy=fsdp
check predict-fsdp 60 $PY -m trainval predict "$WORK/runs/fsdp/config.yaml" --out "$WORK/pred_fsdp.csv"

NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')
if [ "$DEV" = cuda ] && [ "$NGPU" -ge 2 ]; then
  step "2-GPU NCCL runs: DDP, FSDP"
  check ddp-nccl 180 $PY -m trainval fit examples/digits.yaml --nproc 2 $T run.name=ddp
  check fsdp-nccl 180 $PY -m trainval fit examples/digits.yaml --nproc 2 $T run.name=fsdp2 train.strategy=fsdp
fi

# peak memory per rank (torch.cuda.max_memory_allocated), 134M-parameter blocks with AdamW: one line per
# rank and strategy, also in $OUT/memory.txt. On one GPU FSDP shards over one rank (no saving) and
# CPU offload shows what leaves the GPU; on N GPUs the weights, gradients and Adam state are split N ways.
if [ "$DEV" = cuda ]; then
  step "memory: DDP vs FSDP (vs FSDP + CPU offload) per rank, $NGPU GPU(s)"
  if [ "$NGPU" -ge 2 ]; then
    RUN="$PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU"
  else
    RUN=$PY
  fi
  for variant in "--strategy ddp" "--strategy fsdp" "--strategy fsdp --offload"; do
    log="$OUT/memory_$(echo "$variant" | tr -d ' -').log"
    check "memory ${variant}" 150 $RUN benchmarks/fsdp_memory.py $variant >"$log" 2>&1
    grep "^memory" "$log" | tee -a "$OUT/memory.txt" || tail -n 5 "$log"
  done
fi

step "loop-semantics tests with the default device (CUDA when available)"
check loop-semantics 120 $PY -m pytest -q -p no:cacheprovider tests/test_loop_semantics.py

rm -rf "$WORK"
echo; echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo "FAILED: ${failed[*]}")"
exit $status
