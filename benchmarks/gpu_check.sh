#!/usr/bin/env bash
# The one script to run on a machine with a GPU: builds the kernels there, offline,
# on top of the torch already installed; measures what decides impl="auto" on CUDA (WRN-28-10 step fused vs unfused
# at batch 128 in bf16 autocast + channels-last, fp32 TF32 on and off, drop_rate 0 and 0.3; PreAct-ResNet-164;
# LRN at 96x55x55, 256x27x27, 64x56x56, 192x56x56 in fp32 and bf16, NCHW and channels-last, each layout's
# torch.compile baseline in a fresh process); prints every target as MET/MISSED (summary at the end); then
# the CUDA kernel tests; the batched CIFAR pipeline feeding ResNet-20/110 bf16 steps against a batch already
# in GPU memory (>= 90%); every op call of the GPU model's cases beside its predicted time
# (benchmarks/gpu_model.py --measure). JSON and the log go to $OUT when set. Budget: under 5 minutes after the build.
# Imports neither jsonargparse nor wandb (the GPU image has neither).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine
#   BUDGET=480 bash benchmarks/gpu_check.sh           # everything, in one 10-minute device call
#   bash benchmarks/gpu_check.sh --device cpu --quick # smoke test of the same commands here (no build, tiny sizes)
#
# Order: the build, the CUDA kernel tests and compute-sanitizer runs (correctness first), then the benchmarks in order of what they
# decide (the default configurations first, then drop 0.3, PreAct-164, DenseNet, the opt-in variants). Each
# runs only while the elapsed time since the build is under BUDGET seconds (default 290) and is cut at the
# budget, so the check keeps to its 5 minutes whatever the machine; a skipped one prints "skipped (time
# budget)". Adding a benchmark: one line in BENCHMARKS (and its toy-size twin in QUICK_BENCHMARKS);
# "{out}" is replaced by the JSON path prefix.
set -uo pipefail
cd "$(dirname "$0")/.."
device=cuda quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --device cpu|cuda, --quick)" >&2; exit 2 ;;
  esac
done
out_dir="${OUT:-}"
json_dir="${out_dir:-$(mktemp -d)}"
log="$json_dir/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
BUDGET=${BUDGET:-290}

P=benchmarks/bench_bn_relu_conv.py L=benchmarks/bench_lrn.py
# WRN-28-10 variants: kernel vs reference in fresh subprocesses (the compiled variant would cost minutes).
WRN="--device cuda --model wrn28_10 --batch-size 128 --steps 8 --warmup 2 --variants kernel,reference --timeout 120"
LRN="--device cuda --shapes all --batch-size 128 --rounds 30"
BENCHMARKS=(
  # Correctness on the hardware: each kernel under compute-sanitizer (out-of-bounds, shared-memory races,
  # barrier misuse), its results checked against the reference.
  "python benchmarks/sanitize_ops.py --sanitizer memcheck"
  "python benchmarks/sanitize_ops.py --sanitizer racecheck"
  "python benchmarks/sanitize_ops.py --sanitizer synccheck"
  # Each op call of the GPU model's cases (WRN-28-10, PreAct-164, DenseNet-121, the LRNs; both layouts,
  # fp32/bf16) timed beside the model's prediction (benchmarks/gpu_model.json, made on a CPU by
  # benchmarks/gpu_model.py): the measured / predicted ratios calibrate the model (RESULTS.md).
  "python benchmarks/gpu_model.py --measure --predictions benchmarks/gpu_model.json"
  "python $P $WRN --precision bf16 --channels-last --drop-rate 0 --json {out}_wrn_bf16_cl_drop0.json"
  "python $P $WRN --precision tf32 --drop-rate 0 --json {out}_wrn_tf32_drop0.json"
  "python $P $WRN --precision fp32 --drop-rate 0 --json {out}_wrn_fp32_drop0.json"
  "python $L $LRN --dtype float32 --json {out}_lrn_fp32_nchw.json"
  "python $L $LRN --dtype float32 --channels-last --json {out}_lrn_fp32_cl.json"
  "python $L $LRN --dtype bfloat16 --channels-last --json {out}_lrn_bf16_cl.json"
  "python $L $LRN --dtype bfloat16 --json {out}_lrn_bf16_nchw.json"
  # The batched CIFAR pipeline: ResNet-20/110 bf16 channels-last steps fed by it vs a batch already in GPU memory.
  "python benchmarks/bench_data.py --device cuda --gpu-only --rounds 3 --gpu-steps 50 --json {out}_data_pipeline.json"
  "python $P $WRN --precision bf16 --channels-last --drop-rate 0.3 --json {out}_wrn_bf16_cl_drop03.json"
  "python $P $WRN --precision tf32 --drop-rate 0.3 --json {out}_wrn_tf32_drop03.json"
  "python $P $WRN --precision fp32 --drop-rate 0.3 --json {out}_wrn_fp32_drop03.json"
  # The largest batch whose step fits in 16 GiB, fused vs unfused (the fused one should fit more)
  "python $P --device cuda --model wrn28_10 --batch-size 128 --variants kernel,reference --timeout 150 --precision bf16 --channels-last --fit-memory-gib 16 --json {out}_wrn_fit16_bf16_cl.json"
  "python $P --device cuda --model preact_resnet164 --batch-size 128 --steps 10 --warmup 3 --variants kernel,reference --precision tf32 --json {out}_preact164_tf32.json"
  # DenseNet-121 (224x224) and DenseNet-BC-190 k=40 (32x32) training steps at batch 64, naive vs ours, in bf16
  # autocast + channels-last, fp32 with TF32 and fp32 without (12 fresh processes, ~2 min).
  "python benchmarks/bench_dense.py --device cuda --variants naive,ours --timing subprocess --rounds 1 --steps 5 --warmup 2 --json {out}_densenet.json"
  # The other design of each kernel (opt-in): ATen's SyncBatchNorm reductions; LRN's per-column kernels on
  # channels-last inputs (no compile: the runs above have the compiled baselines).
  "env LIGHTCNN_CUDA_BN_REDUCTIONS=aten python $P $WRN --precision bf16 --channels-last --drop-rate 0 --json {out}_wrn_bf16_cl_drop0_aten.json"
  "env LIGHTCNN_CUDA_BN_REDUCTIONS=aten python $P $WRN --precision tf32 --drop-rate 0 --json {out}_wrn_tf32_drop0_aten.json"
  "env LIGHTCNN_CUDA_LRN_CHANNELS_LAST=column python $L $LRN --dtype float32 --channels-last --no-compile --json {out}_lrn_fp32_cl_column.json"
)
# The same commands at toy sizes on the CPU: proves the Python parts run (no timing meaning).
QW="--device cpu --model wrn10_2 --batch-size 2 --steps 1 --warmup 1 --variants kernel,reference --threads 1"
QUICK_BENCHMARKS=(
  "python $P $QW --precision bf16 --channels-last --drop-rate 0.3 --json {out}_wrn_bf16_cl_drop03.json"
  "python $L --device cpu --shapes all --batch-size 1 --rounds 1 --dtype bfloat16 --channels-last --no-compile --json {out}_lrn_bf16_cl.json"
  "python benchmarks/sanitize_ops.py --device cpu"
  "python $P $QW --fit-memory-gib 1 --json {out}_fit.json"
  "python benchmarks/bench_data.py --device cpu --gpu-only --rounds 1 --gpu-steps 1 --batch-size 8 --json {out}_data_pipeline.json"
)

run() {
  echo "=== $*"
  "$@"
  echo "=== exit $? after ${SECONDS}s"
}

build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    nvcc_bin=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
    [ -n "$nvcc_bin" ] || nvcc_bin=$(dirname "$(readlink -f "$(command -v nvcc)")")
    export CUDA_HOME=$(dirname "$nvcc_bin")
  fi
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}" LIGHTCNN_FORCE_CUDA=1
  echo "CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  run timeout 300 python setup.py -q build_ext --inplace
}

main() {
  local benches left
  if [ "$device" = cuda ]; then
    build
    export LIGHTCNN_REQUIRE_KERNELS=1
  fi
  python -c "import json, lightcnn.ops as o, lightcnn.layers as l; print(json.dumps([o.backend_info(), l.backend_info()], indent=1))"
  SECONDS=0
  if [ "$device" = cuda ]; then
    # The CUDA twins of the kernel tests (other test files need packages a GPU box may lack, e.g. wandb).
    kernel_tests=$(ls tests/test_lrn.py tests/test_bn_relu_conv.py tests/test_dense*.py 2>/dev/null)
    run timeout 150 python -m pytest -q -p no:cacheprovider -m cuda $kernel_tests
  fi
  if [ "$quick" = 1 ]; then benches=("${QUICK_BENCHMARKS[@]}"); else benches=("${BENCHMARKS[@]}"); fi
  for cmd in "${benches[@]}"; do
    left=$((BUDGET - SECONDS))
    if [ "$left" -le 5 ]; then echo "=== skipped (time budget): $cmd"; continue; fi
    # shellcheck disable=SC2086  # the command lines are split on purpose
    run timeout "$((left < 200 ? left : 200))" ${cmd//\{out\}/$json_dir/bench}
  done
}

main 2>&1 | tee "$log"
echo "=== targets (JSON and log in $json_dir)"
grep -o -E "(MET|MISSED): .*" "$log"
echo "=== summary: $(grep -c -E '^ *(MET):' "$log") MET, $(grep -c -E '^ *(MISSED):' "$log") MISSED"
