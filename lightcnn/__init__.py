"""lightcnn: the classic CNNs, faithful to their papers, with C++/CUDA kernels and Lightning training."""
__version__ = "0.1.0"
