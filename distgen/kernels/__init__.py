"""Triton kernels for the GPU path; each module also holds a plain-torch reference."""
