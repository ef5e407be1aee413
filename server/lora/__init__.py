"""Adapters in the server: the registry, device slots, adapter files, and the batched LoRA weights."""
