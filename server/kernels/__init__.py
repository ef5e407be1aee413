"""Triton kernels of the CUDA decode path: NF4 matmul for small batches and batched multi-LoRA.

Imported only on CUDA hosts (triton comes with the CUDA build of torch); the CPU path stays plain torch.
"""
