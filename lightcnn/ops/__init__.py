"""The Python face of lightcnn's compiled kernels (torch.ops.lightcnn.*).

Each public function runs the compiled kernel for its device when there is one and the PyTorch
reference (lightcnn.ops.reference) otherwise, warning once; LIGHTCNN_REQUIRE_KERNELS=1 makes a
fallback an error. `backend_info()` says which op is compiled for which device.
"""
from lightcnn.ops._library import backend_info, has_kernel, library_loaded
from lightcnn.ops.bn_relu_conv import bn_relu_conv2d
from lightcnn.ops.dense import dense_bn_relu_conv2d
from lightcnn.ops.lrn import local_response_norm

__all__ = ["backend_info", "bn_relu_conv2d", "dense_bn_relu_conv2d", "has_kernel", "library_loaded", "local_response_norm"]
