"""The Cartridge serving engine: gRPC edge, scheduler, Llama runner with batched LoRA, KV cache, metrics."""
