"""r1mega's CUDA kernels and their dispatch: each op runs its kernel where built and checked, else
its PyTorch path."""
