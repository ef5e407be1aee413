"""The Llama projections a LoRA may target, with the block that holds each.

Kept apart from adapter_dir (which needs torch) so that torch-free code, such as the `cartridge`
command's flag definitions, can name them too."""

PROJECTIONS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
