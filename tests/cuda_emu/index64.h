// Stands in for csrc/cuda/indexing.cuh in the emulator's build (build.py rewrites `#include "indexing.cuh"`
// to this file): the production header, with one test switch added to its 32-bit predicate. When the
// environment variable LIGHTCNN_TEST_INDEX64 is set, fits_32_bits() answers false, so the tests run the
// kernels' 64-bit index paths on small tensors (real sizes would need 2^31 elements to reach them).
#pragma once

#include <cstdlib>

#define fits_32_bits fits_32_bits_of_the_gpu
#include "indexing.cuh"
#undef fits_32_bits

namespace lightcnn {

inline bool fits_32_bits(int64_t extent) {
  return std::getenv("LIGHTCNN_TEST_INDEX64") == nullptr && fits_32_bits_of_the_gpu(extent);
}

}  // namespace lightcnn
