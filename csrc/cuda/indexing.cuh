// Index arithmetic shared by lightcnn's CUDA kernels: grid-stride loops, and division by a divisor fixed
// at launch.
#pragma once

#include <cstdint>

namespace lightcnn {

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 as a multiply-high, an add and a shift (Granlund & Montgomery
// 1994; ATen's IntDivider does the same), where a 64-bit division costs dozens of instructions. The
// kernels use it when every index of the launch is below 2^31, and plain int64_t division otherwise.
struct FastDiv {
  uint32_t magic = 1, shift = 0;
  FastDiv() = default;
  explicit FastDiv(int64_t d) {
    while ((uint64_t(1) << shift) < static_cast<uint64_t>(d)) ++shift;
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t operator()(uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
};

// Whether 32-bit indices (and FastDiv) serve a launch whose largest index is below `extent`.
inline bool fits_32_bits(int64_t extent) { return extent < (int64_t(1) << 31); }

// Calls f(i) for i = this thread's global index, then every gridDim.x * blockDim.x, while i < n.
template <typename index_t, typename F>
__device__ __forceinline__ void grid_stride(index_t n, F&& f) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    f(i);
}

}  // namespace lightcnn
