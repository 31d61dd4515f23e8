// Kernels that check the emulator itself (tests/test_cuda_emulated.py): one correct block reduction, and
// one kernel for each mistake the emulator must report or expose. Built only for the emulator; written as
// a csrc/cuda file is, so it goes through the same rewriting.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace lightcnn {
namespace emu_selftest {
namespace {

// Correct: the sum of a 1-D float tensor by one block (warp shuffles, then shared memory).
__global__ void block_sum_kernel(const float* x, float* out, int64_t n) {
  __shared__ float partial[32];
  float v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += x[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) out[0] = v;
  }
}

// Wrong: reads a neighbour's shared-memory slot without a barrier after the writes.
__global__ void missing_barrier_kernel(const float* x, float* y) {
  __shared__ float s[64];
  s[threadIdx.x] = x[threadIdx.x];
  y[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Wrong: only odd lanes reach a shuffle whose mask names all 32.
__global__ void divergent_shuffle_kernel(float* y) {
  float v = threadIdx.x;
  if (threadIdx.x % 2) v = __shfl_down_sync(0xffffffffu, v, 1);
  y[threadIdx.x] = v;
}

// Wrong: a full-warp mask in a block whose last warp has 16 lanes.
__global__ void partial_warp_kernel(float* y) {
  float v = threadIdx.x;
  v += __shfl_down_sync(0xffffffffu, v, 1);
  y[threadIdx.x] = v;
}

at::Tensor emu_selftest(const at::Tensor& x, int64_t which) {
  at::Tensor y = at::empty_like(x);
  float* yp = y.mutable_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  switch (which) {
    case 0: block_sum_kernel<<<1, 256>>>(xp, yp, x.numel()); break;
    case 1: missing_barrier_kernel<<<1, 64>>>(xp, yp); break;
    case 2: divergent_shuffle_kernel<<<1, 32>>>(yp); break;
    case 3: partial_warp_kernel<<<1, 48>>>(yp); break;
    case 4: block_sum_kernel<<<1, 2048>>>(xp, yp, x.numel()); break;  // more threads than a block can have
    default: TORCH_CHECK(false, "emu_selftest: no case ", which);
  }
  return y;
}

}  // namespace
}  // namespace emu_selftest
}  // namespace lightcnn

TORCH_LIBRARY_IMPL(lightcnn, CUDA, m) {
  m.impl("emu_selftest", &lightcnn::emu_selftest::emu_selftest);
}
