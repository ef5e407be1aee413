"""Gradient checkpointing whose saved layer inputs wait in host memory instead of on the GPU.

With checkpointing, what stays on the GPU between a layer's forward and its backward is its input hidden
state ([B, S, H] per layer: for a 7B shape at 4 x 1024, 2 GB in the float32 that peft's QLoRA preparation
leaves the residual stream in, as it casts the embeddings and norms to float32). Non-reentrant checkpointing keeps
those inputs as autograd saved tensors, so saved-tensor hooks around the checkpoint call see exactly them
(the layer's own activations are taken by the checkpoint's inner hooks and recomputed).

transformers' `activation_checkpointing_enable(offload=True)` is `save_on_cpu(pin_memory=True)`, whose copies
run on the compute stream, so every layer waits for its copy. Here the device-to-host copy runs on a
side stream and the layers go on meanwhile (unsloth's offloaded checkpointer does the same); the copy
back, small beside a layer's backward, is queued on the compute stream just before it is needed.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep each saved tensor in host memory (pinned on CUDA) until backward.

    `offloaded_bytes` counts what was moved off the device. On the CPU the "copy" is a plain copy: it
    changes nothing but runs the same hooks, so CPU tests exercise them."""

    offloaded_bytes = 0  # a class-wide count: one hook object is made per checkpointed layer call

    def __init__(self):
        super().__init__(self._pack, self._unpack)

    @staticmethod
    def _pack(tensor: torch.Tensor):
        HostOffload.offloaded_bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda":
            return tensor.device, tensor.clone(), None
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream = _copy_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))   # the tensor is written by then
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        # The caching allocator would otherwise hand the tensor's memory to the next layer before the copy ran.
        tensor.record_stream(stream)
        copied = torch.cuda.Event()
        copied.record(stream)
        return tensor.device, host, copied

    @staticmethod
    def _unpack(packed) -> torch.Tensor:
        device, host, copied = packed
        if copied is None:
            return host
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def offloaded_checkpoint(function, *args, **kwargs):
    """torch's non-reentrant checkpoint of `function(*args)`, with its saved inputs held by HostOffload.
    A drop-in for transformers' `_gradient_checkpointing_func`."""
    with HostOffload():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def offload_checkpointed_layers(model: torch.nn.Module) -> int:
    """Makes every layer that transformers checkpoints use `offloaded_checkpoint`; returns how many.
    Call after `activation_checkpointing_enable`, which has chosen the layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [module for module in model.modules()
              if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing]
    for layer in layers:
        layer._gradient_checkpointing_func = offloaded_checkpoint
    return len(layers)
