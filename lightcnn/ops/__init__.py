"""The Python face of lightcnn's compiled kernels (torch.ops.lightcnn.*).

Each public function runs the compiled kernel for its device and dtype when there is one and the
PyTorch reference (lightcnn.ops.reference) otherwise (a missing kernel warns once;
LIGHTCNN_REQUIRE_KERNELS=1 makes it an error). Which of the two a *layer* uses by default (impl="auto")
is a per-configuration choice made in lightcnn.layers. `backend_info()` says which op is compiled for
which device, the dtypes its kernels take and the "auto" table; ops/_library.py registers them.
"""
from lightcnn.ops._library import backend_info, has_kernel, library_loaded
from lightcnn.ops.bn_relu_conv import bn_relu_conv2d
from lightcnn.ops.dense import dense_bn_relu_conv2d
from lightcnn.ops.lrn import local_response_norm

__all__ = ["backend_info", "bn_relu_conv2d", "dense_bn_relu_conv2d", "has_kernel", "library_loaded",
           "local_response_norm"]
