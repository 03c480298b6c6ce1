#!/usr/bin/env bash
# GPU check (under 5 minutes on one GPU): the CUDA-only tests, a 1-GPU fit of the examples, a short
# 2-process NCCL equivalence run when 2+ GPUs exist, and the benchmark on the GPU.
# Run from the repository root on a machine with CUDA:  bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $*"; }

step "environment"
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i))
PY

step "CUDA-only tests (sync-debug, pinned/on-device data, precision)"
$PY -m pytest -q tests/test_performance_paths.py tests/test_loop_semantics.py -x || status=1

step "1-GPU fit of the examples"
$PY examples/make_phoneme_data.py --out "$OUT/data" --train 20000 --test 4000 >/dev/null
$PY -m trainval fit examples/digits.yaml "run.out_dir=$OUT/runs" run.overwrite=true train.device=cuda train.progress=false || status=1
$PY -m trainval fit examples/phoneme_mlp.yaml "data.train=$OUT/data/phoneme_train.npz" "data.test=$OUT/data/phoneme_test.npz" \
    "run.out_dir=$OUT/runs" run.overwrite=true train.device=cuda train.precision=bf16 train.progress=false || status=1
$PY -m trainval fit examples/phoneme_mlp.yaml "data.train=$OUT/data/phoneme_train.npz" "data.test=$OUT/data/phoneme_test.npz" \
    "run.out_dir=$OUT/runs" run.name=compiled run.overwrite=true train.device=cuda train.compile=true train.epochs=2 \
    train.progress=false || status=1

if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step "2-GPU NCCL run"
  $PY -m trainval fit examples/digits.yaml --nproc 2 "run.out_dir=$OUT/runs" run.name=ddp run.overwrite=true train.progress=false || status=1
fi

step "benchmark on the GPU (tiny and mlp workloads, 3 alternating runs)"
TRAINVAL_BENCH_DEVICE=cuda $PY benchmarks/compare.py --repeats 3 --contenders hand,notes,trainval,trainval_bar \
    --out "$OUT/bench" || status=1

echo; echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
