// Helpers shared by every kernel of lightcnn (CPU and CUDA). Each op's own shared logic lives in its
// header (lrn.h, bn_relu_conv.h, dense.h); what two ops need alike lives here, once.
// Adding an op (its files and registrations): CONTRIBUTING.md, "A kernel".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

namespace lightcnn {

// The layout a kernel computes in and returns: channels-last when the input is 4-D/5-D, channels-last
// dense and not also contiguous (a 1x1 image or one channel is both: contiguous wins); otherwise the
// contiguous layout (other strides are copied to it). lightcnn/ops/_library.py's memory_format() mirrors
// this for the fake kernels.
inline c10::MemoryFormat kernel_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(c10::MemoryFormat::ChannelsLast))
    return c10::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(c10::MemoryFormat::ChannelsLast3d))
    return c10::MemoryFormat::ChannelsLast3d;
  return c10::MemoryFormat::Contiguous;
}

}  // namespace lightcnn
