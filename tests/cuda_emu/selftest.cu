// Kernels that check the emulator itself (tests/test_cuda_emu.py): one correct block reduction, one kernel
// per intrinsic or built-in variable with the GPU's result, and one kernel for each mistake the emulator
// must report or expose. Built only for the emulator; written as a csrc/cuda file is, so it goes through the
// same rewriting.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "indexing.cuh"

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

// Wrong: lanes 0-15 shuffle with a mask of those 16 lanes, and lane 15 reads lane 16, which it does not name.
__global__ void outside_mask_kernel(float* y) {
  float v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_down_sync(0x0000ffffu, v, 1);
  y[threadIdx.x] = v;
}

// Right: the same 16 lanes with width 16: lane 15's source lies beyond its segment, so it keeps its value.
__global__ void partial_mask_kernel(float* y) {
  float v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_down_sync(0x0000ffffu, v, 1, 16);
  y[threadIdx.x] = v;
}

// __shfl_down_sync in segments of 8 lanes: lane l reads l + 3 within its segment, else keeps its value.
__global__ void width_kernel(float* y) {
  y[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<float>(threadIdx.x), 3, 8);
}

// threadIdx, blockIdx, blockDim, gridDim of a 3-D block in a 2-D grid, each thread at its linear position.
__global__ void indices_kernel(float* y) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * blockIdx.y;
  y[b * blockDim.x * blockDim.y * blockDim.z + t] =
      threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z + 1000 * blockIdx.x + 10000 * blockIdx.y;
}

// atomicAdd from every thread of several blocks into one value.
__global__ void atomic_sum_kernel(const float* x, float* out, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) atomicAdd(out, x[i]);
}

// FastDiv (indexing.cuh, __umulhi inside): x[0] is the divisor, y[i] = x[i] / x[0] rounded down.
__global__ void fast_div_kernel(const float* x, float* y, int64_t n) {
  const lightcnn::FastDiv div(static_cast<int64_t>(x[0]));
  lightcnn::grid_stride(n, [&](int64_t i) { y[i] = static_cast<float>(div(static_cast<uint32_t>(x[i]))); });
}

// Dynamic shared memory and a barrier: the block's values reversed.
__global__ void reverse_kernel(const float* x, float* y) {
  extern __shared__ float buf[];
  buf[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  y[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// Shared memory no thread wrote: the emulator's poison (0xFF bytes, NaN as float).
__global__ void unwritten_shared_kernel(float* y) {
  __shared__ float s[32];
  y[threadIdx.x] = s[threadIdx.x];
}

at::Tensor emu_selftest(const at::Tensor& x, int64_t which) {
  at::Tensor y = at::zeros_like(x);
  float* yp = y.mutable_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  switch (which) {
    case 0: block_sum_kernel<<<1, 256>>>(xp, yp, x.numel()); break;
    case 1: missing_barrier_kernel<<<1, 64>>>(xp, yp); break;
    case 2: divergent_shuffle_kernel<<<1, 32>>>(yp); break;
    case 3: partial_warp_kernel<<<1, 48>>>(yp); break;
    case 4: block_sum_kernel<<<1, 2048>>>(xp, yp, x.numel()); break;  // more threads than a block can have
    case 5: outside_mask_kernel<<<1, 32>>>(yp); break;
    case 6: partial_mask_kernel<<<1, 32>>>(yp); break;
    case 7: width_kernel<<<1, 32>>>(yp); break;
    case 8: indices_kernel<<<dim3(2, 3), dim3(4, 3, 2)>>>(yp); break;  // 6 blocks of 24 threads
    case 9: atomic_sum_kernel<<<4, 64>>>(xp, yp, x.numel()); break;
    case 10: fast_div_kernel<<<2, 64>>>(xp, yp, x.numel()); break;
    case 11: reverse_kernel<<<1, 64, 64 * sizeof(float)>>>(xp, yp); break;
    case 12: unwritten_shared_kernel<<<1, 32>>>(yp); break;
    case 13: reverse_kernel<<<1, 64, 49 * 1024>>>(xp, yp); break;  // above the 48 KiB a launch gets
    case 14: unwritten_shared_kernel<<<dim3(1, 65536), 32>>>(yp); break;  // grid.y beyond 65535
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
