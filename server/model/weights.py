"""Builds the model runner's modules from a transformers-format Llama checkpoint.

Loading adapts the checkpoint to the model: tensors are read one at a time from safetensors,
moved to the device and (for NF4) quantized there, so peak memory stays near the final size.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adapters.formats.adapter_dir import PROJECTIONS, BaseShape
from adapters.formats.checkpoint_shards import CheckpointTensors

from .linear import BaseLinear, DenseLinear, NF4Linear
from ..lora.batch import LoraGroup, LoraStack
from .llama import Attention, FeedForward, ModelArgs, Projections, Transformer, TransformerBlock

_UNSUPPORTED_ROPE = ("dynamic", "longrope")
# Weights that read the same input run as one matmul (model.Projections).
_FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class CheckpointError(ValueError):
    """The checkpoint is not a Llama-family model this runner can serve; the message says why."""


def check_config(config) -> None:
    if config.model_type != "llama":
        raise CheckpointError(f"model_type {config.model_type!r} is not served; only Llama-architecture models are")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise CheckpointError("attention_bias/mlp_bias checkpoints are not served")
    if config.hidden_act != "silu":
        raise CheckpointError(f"hidden_act {config.hidden_act!r} is not served; Llama uses silu")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in _UNSUPPORTED_ROPE:
        raise CheckpointError(f"rope_type {rope_type!r} changes with sequence length and is not served")


def load_model(directory: Path, config, dtype: torch.dtype, device: torch.device, quantize: bool,
               num_lora_slots: int, max_lora_rank: int,
               kernels: bool = False,
               nf4_kernel_max_rows: int = 64) -> tuple[Transformer, dict[tuple[int, str], LoraStack]]:
    """The model and its LoRA stacks, keyed (layer, projection); slot 0 of every stack is the base model's.
    kernels: run through server.kernels (CUDA only): norms, decode attention and multi-LoRA always, NF4 up
    to nf4_kernel_max_rows rows."""
    check_config(config)
    args = ModelArgs.from_config(config)
    shape = BaseShape.from_config(config)
    tensors = CheckpointTensors(directory)

    def read(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{directory}: checkpoint has no tensor {name!r}")
        return tensors.get(name).to(device)

    def weight(name: str) -> torch.Tensor:
        return read(name).to(dtype)

    def base_linear(names: list[str]) -> BaseLinear:
        if quantize:
            return NF4Linear([read(name) for name in names], dtype, nf4_kernel_max_rows if kernels else 0)
        return DenseLinear([weight(name) for name in names])

    stacks: dict[tuple[int, str], LoraStack] = {}
    layers = []
    for i in range(args.n_layers):
        prefix = f"model.layers.{i}"
        projections = []
        for group in _FUSED:
            group_stacks = []
            for projection in group:
                out_features, in_features = shape.projections[projection]
                stacks[(i, projection)] = LoraStack(projection, num_lora_slots, max_lora_rank, in_features,
                                                    out_features, dtype, device)
                group_stacks.append(stacks[(i, projection)])
            names = [f"{prefix}.{PROJECTIONS[projection]}.{projection}.weight" for projection in group]
            projections.append(Projections(base_linear(names), LoraGroup(group_stacks, kernels)))
        qkv, o, gate_up, down = projections
        block = TransformerBlock(args, Attention(args, qkv, o, kernels), FeedForward(gate_up, down), kernels)
        block.input_layernorm.weight.data = weight(f"{prefix}.input_layernorm.weight")
        block.post_attention_layernorm.weight.data = weight(f"{prefix}.post_attention_layernorm.weight")
        layers.append(block)

    embed = nn.Embedding.from_pretrained(weight("model.embed_tokens.weight"), freeze=True)
    tied = args.tie_word_embeddings or "lm_head.weight" not in tensors
    lm_head = DenseLinear([embed.weight if tied else weight("lm_head.weight")])
    inv_freq, attention_scaling = rope_frequencies(config)
    model = Transformer(args, embed, layers, lm_head, inv_freq.to(device), attention_scaling, kernels)
    model.norm.weight.data = weight("model.norm.weight")
    return model.eval(), stacks


def rope_frequencies(config) -> tuple[torch.Tensor, float]:
    """inv_freq [head_dim / 2] and the attention scaling, as transformers' LlamaRotaryEmbedding makes them:
    its default formula, else the same ROPE_INIT_FUNCTIONS entry. Importing the Llama modeling code for
    it cost a second at every server start."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters
    if params["rope_type"] != "default":
        return ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


def base_weight_bytes(model: Transformer) -> int:
    """Bytes of the base model's tensors on the device: weights (packed, for NF4, with their block
    scales), norms and RoPE tables; a tied lm_head counts once. LoRA stacks are not the model's."""
    tensors = {_storage(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        # Plain tensor attributes too (the CPU's prepacked weights), should a module keep one outside its buffers.
        tensors.update({_storage(t): t for t in vars(module).values() if isinstance(t, torch.Tensor)})
        for state in getattr(module, "quant_states", ()):
            while state is not None:    # double quantization nests the scales' own state
                parts = (getattr(state, name, None) for name in ("absmax", "code", "offset"))
                tensors.update({_storage(t): t for t in parts if isinstance(t, torch.Tensor)})
                state = state.state2
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _storage(t: torch.Tensor) -> int:
    """What identifies a tensor's memory: its data pointer, or the object for an opaque oneDNN tensor (no pointer)."""
    return t.data_ptr() if t.layout == torch.strided else id(t)
