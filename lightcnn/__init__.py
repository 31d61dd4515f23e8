"""lightcnn: the classic CNNs, faithful to their papers, with C++/CUDA kernels and Lightning training.

Importing the package registers the compiled ops (torch.ops.lightcnn.*, with their fake and autograd
formulas), so that a torch.export (.pt2) or TorchScript file saved with the kernels loads after
`import lightcnn`."""
__version__ = "0.1.0"

import lightcnn.ops  # noqa: E402,F401  (registers torch.ops.lightcnn.*)
