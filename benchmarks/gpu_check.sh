#!/usr/bin/env bash
# The one script to run on a machine with a GPU (DESIGN.md "GPU check"): builds the kernels there,
# offline, on top of the torch / Lightning / torchmetrics already installed; runs the CUDA tests and
# the kernel benchmarks. Results go to $OUT when that variable is set, to the console otherwise.
# Must finish in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-}"
log="${out_dir:+$out_dir/gpu_check.log}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled

run() {
  echo "=== $*"
  "$@"
  echo "=== exit $? after ${SECONDS}s"
}

main() {
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
  python -c "import json, lightcnn.ops as o; print(json.dumps(o.backend_info(), indent=1))"
  export LIGHTCNN_REQUIRE_KERNELS=1
  # The CUDA twins of the kernel tests (other test files need packages a GPU box may lack, e.g. wandb).
  kernel_tests=$(ls tests/test_lrn.py tests/test_bn_relu_conv.py tests/test_dense*.py 2>/dev/null)
  run timeout 180 python -m pytest -q -p no:cacheprovider -m cuda $kernel_tests
  run timeout 90 python benchmarks/bench_lrn.py --device cuda ${out_dir:+--json $out_dir/bench_lrn_cuda.json}
  # WRN-28-10 training step, kernel vs reference vs compiled reference (inductor compile: 1-2 min).
  run timeout 240 python benchmarks/bench_preact.py --device cuda --batch-size 128 --steps 10 --warmup 3 \
    ${out_dir:+--json $out_dir/bench_preact_cuda.json}
  # DenseNet-121 (224x224) and DenseNet-BC-190 k=40 (32x32) training steps at batch 64, naive vs ours, in bf16
  # autocast + channels-last, fp32 with TF32 and fp32 without (12 fresh processes, ~2 min).
  run timeout 240 python benchmarks/bench_densenet.py --device cuda --variants naive,ours --timing subprocess --rounds 1 --steps 5 \
    --warmup 2 ${out_dir:+--json $out_dir/bench_densenet_cuda.json}
}

if [ -n "$log" ]; then main 2>&1 | tee "$log"; else main 2>&1; fi
